"""nxc-serve: serve a build over HTTP (OpenAI-style chat completions with images, streaming, and a web page)."""
from __future__ import annotations

import argparse
import json
import os
import sys

from nxc.manifest import BuildError
from nxc.runtime.backends import BACKENDS, BackendError


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nxc-serve", description=__doc__.split("\n")[0],
                                 epilog="example: nxc-serve build/fp32 --port 8000, then open http://127.0.0.1:8000/ "
                                        "or POST /v1/chat/completions")
    ap.add_argument("build", help="build directory written by nxc-export")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--workers", type=int, default=1,
                    help="server processes, each with its own Pipeline (default 1; requests within a process share "
                         "its Pipeline)")
    ap.add_argument("--model-name", help="the model id clients send (default: nxc-<build directory name>)")
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    ap.add_argument("--provider", action="append", help="ONNX Runtime provider: cpu, cuda, tensorrt (repeatable)")
    ap.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads per graph (default: all cores)")
    ap.add_argument("--max-batch", type=int, default=8,
                    help="rows decoded together by the continuous-batching scheduler (default 8; 0: one turn per "
                         "thread, no scheduler)")
    ap.add_argument("--max-queue", type=int, default=32,
                    help="turns that may wait for a row when all --max-batch rows are taken; beyond that, 503 "
                         "with Retry-After (default 32; 0: served while a row is free, else 503)")
    ap.add_argument("--max-request-mb", type=float, default=20.0, help="largest request body (default 20 MB)")
    ap.add_argument("--max-image-mpixels", type=float, default=25.0, help="largest image, in M pixels (default 25)")
    ap.add_argument("--max-tokens", type=int, help="cap on the max_tokens a client may ask for")
    ap.add_argument("--allow-local-images", action="store_true",
                    help="let image_url name a file on this machine (only for trusted clients)")
    ap.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        import uvicorn

        from nxc.serve.app import create_app
    except ImportError as e:
        print(f"nxc-serve: needs the serve extra ({e.name} is missing): pip install 'nxc[serve]'", file=sys.stderr)
        return 2
    from nxc.serve.protocol import Limits
    if a.max_batch < 0 or a.max_queue < 0:
        print(f"nxc-serve: --max-batch and --max-queue must be >= 0, got {a.max_batch} and {a.max_queue}",
              file=sys.stderr)
        return 2
    if a.workers < 1:
        print(f"nxc-serve: --workers must be at least 1, got {a.workers}", file=sys.stderr)
        return 2
    limits = Limits(max_request_bytes=int(a.max_request_mb * 1024 * 1024),
                    max_image_pixels=int(a.max_image_mpixels * 1e6), max_tokens=a.max_tokens,
                    allow_local_images=a.allow_local_images)
    opts = {"model": a.model_name, "backend": a.backend, "providers": a.provider, "threads": a.threads,
            "max_batch": a.max_batch, "max_queue": a.max_queue}
    try:
        # load once here, so that a bad build or backend is one line before anything listens
        app = create_app(a.build, limits=limits, **opts)
    except (BuildError, BackendError) as e:
        print(f"nxc-serve: {e}", file=sys.stderr)
        return 2
    model = app.state.server.model
    print(f"nxc-serve: {model} from {a.build} on http://{a.host}:{a.port}/ ({a.workers} worker(s))", flush=True)
    if a.workers == 1:
        uvicorn.run(app, host=a.host, port=a.port, log_level=a.log_level)
        return 0
    del app
    os.environ.update(NXC_SERVE_BUILD=str(a.build), NXC_SERVE_OPTIONS=json.dumps({**opts, "model": model}),
                      NXC_SERVE_LIMITS=json.dumps(limits.__dict__))
    uvicorn.run("nxc.serve.app:app_from_env", factory=True, host=a.host, port=a.port, workers=a.workers,
                log_level=a.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
