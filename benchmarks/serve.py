"""nxc-serve throughput and latency vs calling Pipeline directly: prints JSON.

At 1, 4 and 16 concurrent clients, each client sends requests back to back for the same mixed set of grounding
questions on generated scenes (REC, grounded caption, region, POPE; greedy). "server" is nxc-serve in its own
process (uvicorn, one Pipeline) reached over HTTP on 127.0.0.1 with non-streamed and streamed requests; "direct" is
the same questions through Pipeline.chat from the same number of threads in this process. The overhead ratio is
server p50 / direct p50 at the same concurrency.

    python benchmarks/serve.py [--build build/fp32] [--requests 48] [--clients 1,4,16] [--max-batch 8]

--max-batch is nxc-serve's (0: one turn per worker thread, no scheduler).
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def questions(n: int):
    from nxc.shapes.data import TASKS, make_sample, make_scene
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        s = make_sample(rng, TASKS[i % len(TASKS)], make_scene(rng))
        out.append((s.image, s.question, [list(map(float, b)) for b in s.boxes_in] or None))
    return out


def body(image, question, boxes, stream: bool) -> dict:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": "image_url", "image_url": {"url": uri}}]}],
            "boxes": boxes, "stream": stream}


def stats(latencies: list[float], wall: float) -> dict:
    lat = np.asarray(latencies) * 1000
    return {"requests": len(lat), "requests_per_s": round(len(lat) / wall, 2),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p90_ms": round(float(np.percentile(lat, 90)), 2)}


def run_clients(fn, n_requests: int, clients: int) -> dict:
    latencies = []

    def one(i):
        t0 = time.perf_counter()
        fn(i)
        latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(n_requests)))
    return stats(latencies, time.perf_counter() - t0)


def start_server(build: str, max_batch: int = 8) -> tuple[subprocess.Popen, str]:
    import httpx
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "nxc.serve.cli", build, "--port", str(port), "--log-level",
                             "warning", "--max-batch", str(max_batch), "--max-queue", "256"],
                            stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url + "/healthz", timeout=2)
            return proc, url
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("nxc-serve did not start")
            time.sleep(0.2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="build/fp32")
    ap.add_argument("--requests", type=int, default=48, help="requests per concurrency level and mode")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--max-batch", type=int, default=8, help="nxc-serve --max-batch (0: no scheduler)")
    a = ap.parse_args(argv)
    import httpx

    from nxc.export.exporter import ExportOptions, export_build
    from nxc.manifest import BuildError, load_manifest
    from nxc.runtime.pipeline import Pipeline
    try:
        load_manifest(a.build)
    except BuildError:
        export_build(None, a.build, options=ExportOptions())
    qs = questions(16)
    bodies = {s: [body(*q, stream=s) for q in qs] for s in (False, True)}
    pipe = Pipeline.load(a.build)
    for q in qs:                                          # warm-up: sessions created, first-call costs paid
        pipe.chat(*q[:2], boxes=q[2])
    proc, url = start_server(a.build, a.max_batch)
    report = {"build": a.build, "max_batch": a.max_batch, "requests_per_level": a.requests, "questions": len(qs),
              "levels": []}
    try:
        with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=64)) as http:
            for b in bodies[False]:
                http.post("/v1/chat/completions", json=b).raise_for_status()

            def server(i):
                r = http.post("/v1/chat/completions", json=bodies[False][i % len(qs)])
                r.raise_for_status()

            def server_stream(i):
                with http.stream("POST", "/v1/chat/completions", json=bodies[True][i % len(qs)]) as r:
                    r.raise_for_status()
                    for _ in r.iter_lines():
                        pass

            def direct(i):
                image, question, boxes = qs[i % len(qs)]
                pipe.chat(image, question, boxes=boxes)

            for clients in (int(c) for c in a.clients.split(",")):
                level = {"clients": clients}
                for name, fn in (("direct", direct), ("server", server), ("server_stream", server_stream)):
                    print(f"[serve-bench] {clients} client(s): {name} x {a.requests}", file=sys.stderr, flush=True)
                    level[name] = run_clients(fn, a.requests, clients)
                level["overhead_ratio_p50"] = round(level["server"]["p50_ms"] / level["direct"]["p50_ms"], 3)
                level["overhead_ratio_throughput"] = round(level["direct"]["requests_per_s"]
                                                           / level["server"]["requests_per_s"], 3)
                report["levels"].append(level)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
