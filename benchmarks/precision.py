"""CPU latency and size per precision (fp32 / int8 / int4), for the embedded model and a NExT-Chat with a
TinyLlama-1.1B-sized LLaMA (random weights built here; vision and SAM at the embedded model's sizes).

    python benchmarks/precision.py [--models embedded 1b] [--precisions fp32 int8 int4] [--decode-steps 32]

Prints JSON per model and precision: vision and sam_encoder latency (median ms), decode tokens/s of the llm graph
(prefill of 64 positions, then greedy-style single-token steps through the runtime's in-place KV cache), and
file sizes; plus int8/int4 decode speed-ups over fp32.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def median_ms(fn, runs: int) -> float:
    fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1000 * float(np.median(ts))


def llm_decode(pipe, prompt_tokens: int, steps: int, rng: np.random.Generator) -> tuple[float, float]:
    """Prefill `prompt_tokens` random token rows, then `steps` greedy single-token steps through the runtime's
    KV cache. Returns (prefill ms, decode tokens/s)."""
    cache = pipe.new_cache(prompt_tokens + steps + 1)
    table = pipe.embeddings

    def step(ids):
        return pipe.llm_step(np.asarray(table[ids], np.float32)[None], cache)[0]

    t0 = time.perf_counter()
    logits = step(rng.integers(3, table.shape[0], prompt_tokens))
    prefill_ms = 1000 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(steps):
        logits = step([int(np.argmax(logits))])
    return prefill_ms, steps / (time.perf_counter() - t0)


def measure(build: Path, decode_steps: int, encoder_runs: int) -> dict:
    from nxc import names
    from nxc.runtime.pipeline import Pipeline

    pipe = Pipeline.load(build)
    m = pipe.manifest
    rng = np.random.default_rng(0)
    out: dict = {"files_mb": {}}
    for g in names.GRAPHS:
        if g in m.graphs:
            files = [m.graphs[g].file, *m.graphs[g].external_data]
            out["files_mb"][g] = round(sum((build / f).stat().st_size for f in files) / 1e6, 2)
    out["files_mb"]["total"] = round(sum(p.stat().st_size for p in build.rglob("*") if p.is_file()) / 1e6, 2)
    r, s = m.clip.size, m.sam.size
    px = rng.standard_normal((1, 3, r, r)).astype(np.float32)
    out["vision_ms"] = median_ms(lambda: pipe.run(names.GRAPH_VISION, pixel_values=px), encoder_runs)
    sp = rng.standard_normal((1, 3, s, s)).astype(np.float32)
    out["sam_encoder_ms"] = median_ms(lambda: pipe.run(names.GRAPH_SAM_ENCODER, image=sp), max(3, encoder_runs // 3))
    out["prefill_64_ms"], out["decode_tokens_per_s"] = llm_decode(pipe, 64, decode_steps, rng)
    return out


def tinyllama_model(vocab_size: int | None = None):
    """NExT-Chat with TinyLlama-1.1B's LLaMA sizes (vocab 32005 unless given), random weights, seed 0."""
    from dataclasses import replace

    import torch

    from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, NextChatConfig
    from nxc.model.nextchat import NextChat
    torch.manual_seed(0)
    v = VISION_SIZES["shapes"]
    llm = LLAMA_SIZES["tinyllama-1.1b"]
    llm = replace(llm, vocab_size=vocab_size) if vocab_size else llm
    cfg = NextChatConfig(llm=llm, vision=v, sam=SAM_SIZES["shapes"], mm_hidden_size=v.hidden_size)
    with torch.no_grad():
        return NextChat(config=cfg).eval()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["embedded", "1b"], choices=["embedded", "1b"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "int8", "int4"], choices=["fp32", "int8", "int4"])
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--encoder-runs", type=int, default=15)
    a = ap.parse_args(argv)
    from nxc.assets import embedded_checkpoint
    from nxc.export.exporter import ExportOptions, export_build, export_model
    from nxc.model.sp_tokenizer import SentencePieceOracle

    result = {"machine": {"cpu_count": os.cpu_count()}, "decode_steps": a.decode_steps, "models": {}}
    graphs = ("vision", "llm", "sam_encoder")
    for name in a.models:
        res = result["models"][name] = {}
        model = tinyllama_model() if name == "1b" else None
        for prec in a.precisions:
            tmp = Path(tempfile.mkdtemp(prefix=f"nxc-{name}-{prec}-"))
            opts = ExportOptions(precision=prec, graphs=graphs, calib_samples=4, parity=name == "embedded",
                                 max_context=512)
            t0 = time.perf_counter()
            if model is None:
                export_build(None, tmp / "b", options=opts)
            else:
                tok = embedded_checkpoint()
                export_model(model, SentencePieceOracle.from_dir(tok), tmp / "b", tokenizer_dir=tok, options=opts,
                             embedded=True, source={"checkpoint": "benchmark: random weights"})
            export_s = time.perf_counter() - t0
            print(f"[bench] {name} {prec}: exported in {export_s:.0f} s, measuring", file=sys.stderr, flush=True)
            res[prec] = {"export_s": round(export_s, 1), **measure(tmp / "b", a.decode_steps, a.encoder_runs)}
            shutil.rmtree(tmp, ignore_errors=True)
        if "fp32" in res:
            for prec in a.precisions:
                res[prec]["decode_speedup_vs_fp32"] = res[prec]["decode_tokens_per_s"] / res["fp32"]["decode_tokens_per_s"]
    import onnxruntime
    result["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
