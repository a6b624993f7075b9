"""nxc-triton: write a Triton model repository for a build directory (one model per graph + the chat model)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nxc.manifest import BuildError
from nxc.triton.chat import CHAT_MODEL
from nxc.triton.repo import GRAPH_BACKENDS, VARIANTS, RepoError, models, serve_command, write_repository


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nxc-triton", description=__doc__.split("\n")[0],
                                 epilog="example: nxc-triton build/fp16 triton-repo   (then run the printed docker "
                                        "command; stream with POST /v2/models/nxc_chat/generate_stream)")
    ap.add_argument("build", help="build directory written by nxc-export")
    ap.add_argument("repo", help="model repository folder to write")
    ap.add_argument("--variant", choices=VARIANTS, default="ngc",
                    help="ngc: Triton's onnxruntime/tensorrt backends on the GPU, for the NGC container (default); "
                         "python: every graph in a Python-backend model on ONNX Runtime CPU (a tritonserver with "
                         "only the Python backend, as pytriton's)")
    ap.add_argument("--backend", choices=GRAPH_BACKENDS, default="onnxruntime",
                    help="what runs the graph models of the ngc variant (default onnxruntime)")
    ap.add_argument("--engines", type=Path, metavar="DIR",
                    help="nxc-build engine folder for --backend tensorrt (BUILD/engines/<gpu>-trt<version>)")
    ap.add_argument("--instances", type=_count, default=1, help="instances of each model (default 1)")
    ap.add_argument("--force", action="store_true", help="replace REPO if it is not empty")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        repo = write_repository(a.build, a.repo, variant=a.variant, backend=a.backend, engines=a.engines,
                                instances=a.instances, force=a.force)
    except (BuildError, RepoError) as e:
        print(f"nxc-triton: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"nxc-triton: cannot write {a.repo}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"wrote {repo}: models {', '.join(models(repo))} ({a.variant} variant)")
    if a.variant == "ngc":
        print(f"\nserve it (nxc_chat imports nxc, so the container installs it first):\n"
              f"  {serve_command(repo, a.backend)}")
    else:
        print(f"\nserve it with a tritonserver that has the Python backend and whose stub's Python imports nxc "
              f"(the nxc.triton docstring says how):\n  tritonserver --model-repository={repo.resolve()}")
    print(f"\nstream a grounded answer:\n  curl -N localhost:8000/v2/models/{CHAT_MODEL}/generate_stream "
          "-d '{\"prompt\": \"Where is the red circle?\", \"image\": \"'$(base64 -w0 photo.png)'\"}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
