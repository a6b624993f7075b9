"""Export a NExT-Chat whose LLaMA has TinyLlama-1.1B sizes (hidden 2048, 22 layers, 32 heads, 4 KV heads,
vocab 32005; random weights built here) and print JSON: export time, peak memory, file sizes.

    python benchmarks/export_1b.py [--out DIR] [--keep] [--skip-parity]

Vision tower and SAM use the embedded model's small sizes (the LLM is what this measures); the tokenizer files
are the embedded model's (ids beyond its vocabulary are never produced by random weights in a benchmark).
The llm graph is over 2 GB, so it is written with ONNX external data.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2     # ru_maxrss is in KiB on Linux


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="build directory (default: a temporary one, removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--max-context", type=int, default=2048)
    a = ap.parse_args(argv)

    import torch

    from nxc.assets import embedded_checkpoint
    from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, NextChatConfig
    from nxc.export.exporter import ExportOptions, export_model
    from nxc.model.nextchat import NextChat
    from nxc.model.sp_tokenizer import SentencePieceOracle

    t0 = time.perf_counter()
    torch.manual_seed(0)
    vision = VISION_SIZES["shapes"]
    config = NextChatConfig(llm=LLAMA_SIZES["tinyllama-1.1b"], vision=vision, sam=SAM_SIZES["shapes"],
                            mm_hidden_size=vision.hidden_size)
    with torch.no_grad():
        model = NextChat(config=config).eval()      # HF's LLaMA init: normal(0, 0.02) weights
    n_params = sum(p.numel() for p in model.llm.parameters())
    build_s = time.perf_counter() - t0
    print(f"built the model: LLM {n_params / 1e9:.2f} B parameters in {build_s:.0f} s", file=sys.stderr, flush=True)
    tok_dir = embedded_checkpoint()
    tokenizer = SentencePieceOracle.from_dir(tok_dir)
    tmp = None
    out = Path(a.out) if a.out else Path(tempfile.mkdtemp()) / "tinyllama-fp32"
    if not a.out:
        tmp = out.parent
    t1 = time.perf_counter()
    export_model(model, tokenizer, out, tokenizer_dir=tok_dir, source={"checkpoint": "benchmark: random weights"},
                 options=ExportOptions(max_context=a.max_context, parity=not a.skip_parity))
    export_s = time.perf_counter() - t1
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    result = {"llm_parameters": n_params, "model_build_s": build_s, "export_s": export_s,
              "peak_rss_gb": peak_rss_gb(), "parity_checked": not a.skip_parity,
              "file_bytes": files, "total_gb": sum(files.values()) / 1e9, "torch": torch.__version__}
    print(json.dumps(result, indent=2))
    if tmp and not a.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
