"""Helpers of the serve tests: a real nxc-serve (uvicorn on 127.0.0.1, a free port, in a thread), data URIs."""
import base64
import io
import socket
import threading
import time



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, app):
        import uvicorn
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("nxc-serve did not start within 30 s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)



def start_nxc_serve(build, port: int):
    """`nxc-serve BUILD --port PORT` in its own process, returned once /healthz answers (within 60 s)."""
    import subprocess
    import sys

    import httpx
    proc = subprocess.Popen([sys.executable, "-m", "nxc.serve.cli", str(build), "--port", str(port),
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
            return proc, health
        except httpx.TransportError:
            if proc.poll() is not None:
                raise RuntimeError(proc.stderr.read())
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("nxc-serve did not answer within 60 s")
            time.sleep(0.2)


def data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
