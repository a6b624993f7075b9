"""nxc-export: a NExT-Chat checkpoint (default: the embedded shapes model) -> a build directory."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nxc import names


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nxc-export", description=__doc__,
        epilog="example: nxc-export --fp16 --out build/fp16   (exports the embedded model)")
    ap.add_argument("checkpoint", nargs="?", help="official-layout NExT-Chat checkpoint directory, a retrieval "
                    "(ChatRex-style) checkpoint, or a NExT-GPT-style (generation) checkpoint with its generator/ "
                    "folder (nxc-make-checkpoint --family nextgpt); `embedded:shapes-retrieval` and "
                    "`embedded:shapes-nextgpt` are the shipped retrieval and drawing models (default: the embedded "
                    "shapes NExT-Chat)")
    ap.add_argument("--clip", metavar="DIR", help="CLIP vision model directory, if not the checkpoint's own")
    ap.add_argument("--sam", metavar="FILE", help="SAM weights, if not inside the checkpoint")
    ap.add_argument("--out", metavar="DIR", help="build directory to write (default: build/<precision>)")
    prec = ap.add_mutually_exclusive_group()
    prec.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="float32 (default)")
    prec.add_argument("--fp16", dest="precision", action="store_const", const="fp16",
                      help="float16 weights and activations, float32 inputs/outputs")
    prec.add_argument("--int8", dest="precision", action="store_const", const="int8",
                      help="int8: QDQ static vision/sam_encoder (calibrated), int8 weight-only loc_heads and llm")
    prec.add_argument("--int4", dest="precision", action="store_const", const="int4",
                      help="as --int8 but a block-wise int4 weight-only llm")
    ap.add_argument("--max-context", type=int, metavar="N", help="longest prompt + reply the build serves "
                    "(default: the model's max_position_embeddings, at most 4096)")
    ap.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, what TensorRT >= 8.6 parses)")
    ap.add_argument("--graphs", nargs="+", choices=names.EXPORT_GRAPHS, default=[], metavar="GRAPH",
                    help=f"graphs to export (default: all of the model's: {', '.join(names.GRAPHS)} for NExT-Chat, "
                         f"{', '.join(names.RETRIEVAL_GRAPHS)} for a retrieval model, "
                         f"{', '.join(names.GENERATION_GRAPHS)} for a NExT-GPT model)")
    ap.add_argument("--calib-images", metavar="DIR", help="calibration images for --int8/--int4's calibrated graphs, "
                    "vision and sam_encoder (default for the embedded model: generated shapes scenes; required for a "
                    "real checkpoint that exports either of them quantized; the weight-only llm and loc_heads need "
                    "none)")
    ap.add_argument("--calib-prompts", metavar="FILE", help="calibration prompts, one per line")
    ap.add_argument("--calib-method", choices=("minmax", "entropy", "percentile"), default="minmax")
    ap.add_argument("--calib-samples", type=int, default=32, metavar="N", help="calibration images to use (32)")
    ap.add_argument("--recalibrate", action="store_true", help="measure ranges again even if <out>/calib has them")
    ap.add_argument("--float-graphs", nargs="+", default=[], choices=("vision", "sam_encoder"), metavar="GRAPH",
                    help="with --int8/--int4: keep these encoders float32 (no calibration), e.g. sam_encoder")
    ap.add_argument("--modules", metavar="FILE", help="a module-call table (VITRON-style: JSON with grammar, region, "
                    "calls and, for a generate module, generator.path: a diffusers folder with its text encoder); "
                    "written into the build, the generator exported beside it")
    ap.add_argument("--block-size", type=int, default=32, metavar="N",
                    help="with --int8/--int4: the llm's MatMulNBits blocks along K, 16-256 (32; larger blocks store "
                         "fewer float32 scales and prefill faster, at some accuracy: see README, llama.cpp)")
    ap.add_argument("--skip-parity", action="store_true", help="do not run the ONNX Runtime vs torch check")
    ap.add_argument("--triton", metavar="REPO", help="then write a Triton model repository of the build to REPO "
                    "(nxc-triton's ngc variant: onnxruntime graph models and the nxc_chat streaming model)")
    ap.set_defaults(precision="fp32")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.opset < 17:
        print(f"nxc-export: --opset {a.opset} is too old; the graphs need opset 17 or newer.", file=sys.stderr)
        return 2
    try:
        from nxc.export.exporter import ExportError, ExportOptions, export_build
        from nxc.model.checkpoint import CheckpointError
        from nxc.model.generator import GeneratorError
    except ImportError as e:
        print(f"nxc-export: needs the export extra ({e.name} is not installed): pip install 'nxc[export]'",
              file=sys.stderr)
        return 2
    from nxc.calib.data import CalibrationError
    from nxc.config import ConfigError
    if a.triton and Path(a.triton).is_dir() and any(Path(a.triton).iterdir()):
        print(f"nxc-export: --triton {a.triton} is not empty; choose another folder (nxc-triton --force replaces "
              "one)", file=sys.stderr)
        return 2
    out = a.out or f"build/{a.precision}"
    opts = ExportOptions(precision=a.precision, max_context=a.max_context, opset=a.opset, graphs=tuple(a.graphs),
                         parity=not a.skip_parity, calib_images=a.calib_images, calib_prompts=a.calib_prompts,
                         calib_method=a.calib_method, calib_samples=a.calib_samples, recalibrate=a.recalibrate,
                         float_graphs=tuple(a.float_graphs), modules=a.modules, block_size=a.block_size)
    checkpoint = a.checkpoint
    if checkpoint and checkpoint.startswith("embedded:"):
        from nxc import assets
        try:
            checkpoint = str(assets.resolve_checkpoint(checkpoint))
        except FileNotFoundError as e:
            print(f"nxc-export: {e}", file=sys.stderr)
            return 2
    try:
        build = export_build(checkpoint, out, clip_dir=a.clip, sam_file=a.sam, options=opts)
    except (ExportError, CheckpointError, ConfigError, CalibrationError, GeneratorError, FileNotFoundError) as e:
        print(f"nxc-export: {e}", file=sys.stderr)
        return 1
    if a.triton:
        from nxc.triton.repo import RepoError, write_repository
        try:
            repo = write_repository(build, a.triton)
        except (RepoError, OSError) as e:
            print(f"nxc-export: the build is written, the Triton repository is not: {e}", file=sys.stderr)
            return 1
        print(f"[nxc-export] wrote Triton model repository {repo} (nxc-triton prints how to serve it)",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
