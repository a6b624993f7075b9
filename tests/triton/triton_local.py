"""A real tritonserver on 127.0.0.1 for the Triton tests: pytriton's binary (Python backend only), its stub for this
Python, and a stub environment that imports numpy<2 before this venv's packages (why: the nxc.triton docstring).

    dist = tritonserver_dist()                       # None when pytriton's binary is not installed
    with LocalTriton(repo, dist=dist, work=tmp, load=[...]) as server:
        httpx.post(f"{server.url}/v2/models/nxc_chat/generate_stream", json=...)
"""
import base64
import importlib.util
import io
import os
import shutil
import signal
import site
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import httpx

PY = f"{sys.version_info.major}.{sys.version_info.minor}"


def tritonserver_dist() -> Path | None:
    """pytriton's tritonserver folder (bin/, backends/, python_backend_stubs/): the Makefile's --target install
    (.venv/pytriton), else an installed pytriton package. None when neither has the binary."""
    candidates = [Path(sys.prefix) / "pytriton" / "pytriton" / "tritonserver"]
    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) / "tritonserver" for p in spec.submodule_search_locations]
    for dist in candidates:
        if (dist / "bin" / "tritonserver").is_file() and (dist / "python_backend_stubs" / PY).is_dir():
            return dist
    return None


def _numpy_major(folder: Path) -> int | None:
    found = sorted(folder.glob("numpy-*.dist-info"))
    return int(found[-1].name.split("-")[1].split(".")[0]) if found else None


def numpy1_folder(dist: Path, scratch: Path) -> Path:
    """A folder holding numpy<2 for the stub: beside pytriton (the Makefile installs it there), else installed
    now with pip into `scratch`."""
    if _numpy_major(dist.parent.parent) == 1:
        return dist.parent.parent
    run = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(scratch),
                          "numpy<2"], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"pytriton's Python stub needs numpy<2 and pip could not install it into {scratch}: "
                           f"{run.stderr.strip()[-400:]}")
    return scratch


def stub_environment(folder: Path, numpy_folder: Path) -> Path:
    """A venv-shaped folder for the stub's embedded Python: bin/python3 (this interpreter's base), pyvenv.cfg, and a
    .pth that puts `numpy_folder` first, then this environment's site-packages (nxc, onnxruntime, ...)."""
    base = Path(sys._base_executable).resolve()
    sp = folder / "lib" / f"python{PY}" / "site-packages"
    sp.mkdir(parents=True)
    (folder / "bin").mkdir()
    (folder / "bin" / "python3").symlink_to(base)
    (folder / "pyvenv.cfg").write_text(f"home = {base.parent}\ninclude-system-site-packages = false\n"
                                       f"version = {sys.version.split()[0]}\n")
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    lines = [str(numpy_folder)] + [f"import site; site.addsitedir({p!r})" for p in dict.fromkeys(ours)]
    (sp / "nxc-triton-stub.pth").write_text("\n".join(lines) + "\n")
    return folder


def backend_directory(dist: Path, folder: Path) -> Path:
    """backends/python/ with the Python backend and the stub built for this Python (as pytriton prepares it)."""
    py = folder / "python"
    py.mkdir(parents=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        shutil.copy2(dist / "backends" / "python" / name, py / name)
    shutil.copy2(dist / "python_backend_stubs" / PY / "triton_python_backend_stub", py / "triton_python_backend_stub")
    return folder


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalTriton:
    """tritonserver over `repo` on 127.0.0.1 (free ports), models in `load` only; stopped on exit, always."""

    def __init__(self, repo: Path, *, dist: Path, work: Path, load: list[str], startup_s: float = 120):
        self.repo, self.dist, self.work, self.load, self.startup_s = repo, dist, work, load, startup_s
        self.proc = None
        self.log = work / "tritonserver.log"
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3)
        self.url = f"http://127.0.0.1:{self.http_port}"

    def command(self, backends: Path) -> list[str]:
        return [str(self.dist / "bin" / "tritonserver"), f"--model-repository={self.repo}",
                f"--backend-directory={backends}", "--http-address=127.0.0.1", f"--http-port={self.http_port}",
                "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}", "--metrics-address=127.0.0.1",
                f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--exit-timeout-secs=5",
                f"--backend-config=python,shm-region-prefix-name=nxc{uuid.uuid4().hex[:8]}",
                "--model-control-mode=explicit", *[f"--load-model={m}" for m in self.load]]

    def environment(self, stub_env: Path) -> dict:
        env = dict(os.environ)
        libs = [f"{sys.base_prefix}/lib", str(self.dist.parent.parent / "nvidia_pytriton.libs")]
        env["LD_LIBRARY_PATH"] = ":".join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = f"{stub_env / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
        return env

    def __enter__(self):
        backends = backend_directory(self.dist, self.work / "backends")
        stub_env = stub_environment(self.work / "stub-env", numpy1_folder(self.dist, self.work / "numpy1"))
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(self.command(backends), env=self.environment(stub_env), stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self):
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"tritonserver was not ready within {self.startup_s:.0f} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self):
        """SIGTERM to the server's own process group (the server and its stubs), SIGKILL after 20 s."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def __exit__(self, *exc):
        self.stop()


def b64_png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()
