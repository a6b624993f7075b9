"""nxc-build: TensorRT engines for a build directory, built for this machine's GPU and TensorRT version."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nxc import names


def no_tensorrt() -> str:
    from nxc.runtime.backends.trt import install_hint
    return (f"nxc-build: TensorRT is not installed ({install_hint('tensorrt')}); engines can only be built on a "
            "machine with an NVIDIA GPU")


# every graph a build may hold (nxc-doctor's fixes name them): NExT-Chat's, the retrieval family's, a generator's
ENGINE_GRAPHS = (*names.ALL_GRAPHS, names.GRAPH_PROJECTOR, *names.GENERATOR_GRAPHS, names.GRAPH_TEXT_ENCODER)


class _Unavailable(Exception):
    """TensorRT or a GPU is missing: the message is the one line to print."""


def _megabytes(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 MB, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nxc-build", description=__doc__,
        epilog="example: nxc-build build/fp16 --timing-cache trt.cache   "
               "(writes build/fp16/engines/<gpu>-trt<version>/; then nxc-run build/fp16 --backend tensorrt ...)")
    ap.add_argument("build", help="build directory written by nxc-export")
    prec = ap.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="let TensorRT run layers in float16 (default: the build's own precision)")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="int8 engines from an int8 build's Q/DQ graphs (explicit quantization, no calibration)")
    ap.add_argument("--workspace", type=_megabytes, metavar="MB",
                    help="TensorRT workspace limit in MB (default: TensorRT's own, the device memory)")
    ap.add_argument("--timing-cache", type=Path, metavar="FILE",
                    help="reuse this timing cache if it exists and write it back (faster rebuilds)")
    ap.add_argument("--graphs", nargs="+", choices=ENGINE_GRAPHS, metavar="GRAPH",
                    help=f"graphs to build (default: all of the build's; choose from {', '.join(ENGINE_GRAPHS)}); "
                         "engines of other graphs already built here are kept")
    ap.add_argument("--verbose", action="store_true", help="show TensorRT's warnings (and tracebacks)")
    return ap


def _environment():
    """(tensorrt module, {"name", "compute_capability"} of GPU 0); _Unavailable with the line to print."""
    try:
        import tensorrt as trt
    except ImportError:
        raise _Unavailable(no_tensorrt()) from None
    except OSError as e:                                     # the wheel is there but its CUDA libraries are not
        raise _Unavailable(f"nxc-build: TensorRT could not be loaded ({e}); engines can only be built on a "
                           "machine with an NVIDIA GPU and its driver") from None
    from nxc.runtime.backends import BackendError
    from nxc.runtime.backends.trt import gpu_identity
    try:
        return trt, gpu_identity()
    except BackendError as e:
        raise _Unavailable(f"nxc-build: cannot build engines here: {e}") from None


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        trt, gpu = _environment()
    except _Unavailable as e:
        print(e, file=sys.stderr)
        return 2
    from nxc.engines.trt_build import EngineBuildError, EngineOptions, build_engines
    from nxc.manifest import BuildError
    from nxc.runtime.backends import BackendError
    opts = EngineOptions(precision=a.precision, workspace_mb=a.workspace, timing_cache=a.timing_cache,
                         graphs=tuple(a.graphs) if a.graphs else None, verbose=a.verbose)
    try:
        folder = build_engines(a.build, options=opts, trt=trt, gpu=gpu)
    except (BuildError, BackendError) as e:
        print(f"nxc-build: {e}", file=sys.stderr)
        return 2
    except (EngineBuildError, OSError) as e:
        print(f"nxc-build: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nxc-build: interrupted; the engine folder was left as it was", file=sys.stderr)
        return 130
    except Exception as e:                                   # a TensorRT binding raising: one line, unless --verbose
        if a.verbose:
            raise
        print(f"nxc-build: TensorRT failed: {type(e).__name__}: {' '.join(str(e).split())[:400]} "
              "(--verbose shows more)", file=sys.stderr)
        return 1
    print(f"[nxc-build] wrote {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
