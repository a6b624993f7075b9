"""Decode speed of the nxc runtime against the PyTorch reference and onnxruntime-genai, on the same weights, in
the same run: the embedded model and a NExT-Chat with a TinyLlama-1.1B-sized LLaMA (random weights built here).

    pip install onnxruntime-genai    # benchmark-only dependency (its model builder makes the genai builds)
    python benchmarks/decode_vs.py [--models embedded 1b] [--steps 32] [--prompt-tokens 64]

Prints JSON per model: decode tokens/s of
  - torch      the reference LLaMA (eager, fp32, DynamicCache), one token per step
  - nxc fp32 / nxc int4     the exported llm graph through the runtime's KV cache (nxc.runtime)
  - genai fp32 / genai int4 onnxruntime-genai's builder output of the same LLaMA weights (CPU), greedy
  - llama.cpp Q4_0 / Q8_0   (--llama-cpp, issue 30) the same weights through llama.cpp's convert_hf_to_gguf.py and
                            llama-quantize, timed by llama-bench at the same threads: decode at the context nxc
                            decodes at (-d PROMPT -n STEPS) and prompt processing of --prefill-tokens (nxc's prefill
                            of as many rows is timed beside it); Q4_0 against nxc int4, Q8_0 against nxc int8
                            (benchmarks/llama_cpp_bench.py builds it once; skipped with the reason where it cannot)
with the % of this machine's copy-bandwidth roofline (bytes a step must read: weights + KV cache) and ratios.
For the embedded model also end to end through the whole pipeline, text-only and grounded prompts, vs the
reference. The 1.1B model has random weights, so it never emits a trigger: only text-only decode is measured.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def torch_decode(model, prompt_tokens: int, steps: int) -> float:
    import torch
    from transformers import DynamicCache
    torch.set_num_threads(os.cpu_count())
    ids = torch.randint(3, model.config.llm.vocab_size, (1, prompt_tokens))
    with torch.no_grad():
        cache = DynamicCache()
        logits, _ = model.llm_step(model.embed_tokens(ids), cache)
        t0 = time.perf_counter()
        for _ in range(steps):
            nxt = logits.argmax(-1, keepdim=True)
            logits, _ = model.llm_step(model.embed_tokens(nxt), cache)
        return steps / (time.perf_counter() - t0)


def nxc_decode(build: Path, prompt_tokens: int, steps: int) -> float:
    from precision import llm_decode

    from nxc.runtime.pipeline import Pipeline
    return llm_decode(Pipeline.load(build), prompt_tokens, steps, np.random.default_rng(0))[1]


def nxc_prefill(build: Path, tokens: int) -> float:
    """Prompt processing tokens/s: `tokens` rows in one prefill (the runtime's chunking), median of 3."""
    from precision import llm_decode

    from nxc.runtime.pipeline import Pipeline
    pipe = Pipeline.load(build)
    ms = [llm_decode(pipe, tokens, 1, np.random.default_rng(k))[0] for k in range(3)]
    return tokens / (float(np.median(ms)) / 1000)


def hf_folder(model, out: Path) -> Path:
    """The LLaMA as a Hugging Face folder (safetensors, the embedded checkpoint's tokenizer files): what
    onnxruntime-genai's builder and llama.cpp's converter read."""
    hf = out / "hf"
    if not hf.is_dir():
        model.llm.save_pretrained(hf, safe_serialization=True)
        from nxc.assets import embedded_checkpoint       # the builder also packs a tokenizer: any LLaMA one will do
        src = embedded_checkpoint()
        for f in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            if (src / f).is_file():
                shutil.copy(src / f, hf / f)
    return hf


def genai_build(model, out: Path, precision: str) -> Path:
    """onnxruntime-genai's builder on the same LLaMA weights (saved as a Hugging Face folder first)."""
    hf = hf_folder(model, out)
    dst = out / f"genai-{precision}"
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(dst), "-p", precision,
           "-e", "cpu", "-c", str(out / "cache")]
    import subprocess
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"onnxruntime-genai builder failed: {res.stderr[-800:]}")
    return dst


def genai_decode(path: Path, vocab: int, prompt_tokens: int, steps: int) -> float:
    import onnxruntime_genai as og
    model = og.Model(str(path))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_tokens + steps + 1, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.random.default_rng(0).integers(3, vocab, prompt_tokens).astype(np.int32).reshape(1, -1))
    gen.generate_next_token()
    t0 = time.perf_counter()
    for _ in range(steps):
        gen.generate_next_token()
    return steps / (time.perf_counter() - t0)


def step_bytes(build: Path, prompt_tokens: int, steps: int) -> float:
    from nxc.manifest import load_manifest
    from nxc.profile.profiler import decode_step_bytes
    return decode_step_bytes(load_manifest(build, verify=False), prompt_tokens + steps // 2)


def end_to_end(build: Path, runs: int) -> dict:
    from nxc.assets import embedded_checkpoint
    from nxc.model.reference import ReferenceChat
    from nxc.profile.profiler import run_once
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.data import make_scene
    pipe, ref = Pipeline.load(build), ReferenceChat.load(embedded_checkpoint())
    scene = make_scene(np.random.default_rng(7), max_objects=3)
    o = scene.objects[0]
    out = {}
    for kind, prompt in (("text_only", f"Is there a {o.colour} {o.shape} in the image?"),
                         ("grounded", "Can you describe the image and include object locations?")):
        ours, theirs = [], []
        for _ in range(runs + 1):
            ours.append(run_once(pipe, scene.image, prompt, 64)[0]["e2e"])
            t0 = time.perf_counter()
            ref.chat(scene.image, prompt, max_new_tokens=64)
            theirs.append(time.perf_counter() - t0)
        a, b = float(np.median(ours[1:])), float(np.median(theirs[1:]))
        out[kind] = {"nxc_ms": 1000 * a, "torch_ms": 1000 * b, "speedup_vs_torch": b / a}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["embedded", "1b"], choices=["embedded", "1b"])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--e2e-runs", type=int, default=5)
    ap.add_argument("--llama-cpp", action="store_true", help="also llama.cpp Q4_0 / Q8_0 on the same weights, and "
                    "nxc int8 (issue 30; builds llama.cpp once: benchmarks/llama_cpp_bench.py)")
    ap.add_argument("--prefill-tokens", type=int, default=512, help="--llama-cpp: prompt length of the prefill "
                    "comparison (512)")
    ap.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "int8", "int4"],
                    help="nxc builds to measure (fp32 int4; with --llama-cpp fp32 int8 int4)")
    ap.add_argument("--block-size", type=int, default=32, help="nxc int8 / int4: nxc-export --block-size (32)")
    ap.add_argument("--skip-genai", action="store_true", help="leave onnxruntime-genai out")
    a = ap.parse_args(argv)
    precisions = a.precisions or (["fp32", "int8", "int4"] if a.llama_cpp else ["fp32", "int4"])
    from nxc.export.exporter import ExportOptions, export_model
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.profile.profiler import measure_bandwidth
    sys.path.insert(0, str(Path(__file__).parent))
    from precision import tinyllama_model

    from nxc.assets import embedded_checkpoint
    bw = measure_bandwidth()
    result = {"machine": {"cpu_count": os.cpu_count(), "bandwidth_gbs": bw}, "steps": a.steps,
              "block_size": a.block_size,
              "prompt_tokens": a.prompt_tokens, "models": {}}
    llama = None
    if a.llama_cpp:
        import llama_cpp_bench as llama_cpp
        try:
            llama = llama_cpp.tree(log=lambda m: log(f"llama.cpp: {m}"))
            result["llama_cpp"] = {"tree": str(llama), "version": f"llama-cpp-python {llama_cpp.VERSION} sdist"}
        except llama_cpp.Unavailable as e:
            result["llama_cpp"] = f"skipped: {e}"
    tok_dir = embedded_checkpoint()
    for name in a.models:
        work = Path(tempfile.mkdtemp(prefix=f"nxc-vs-{name}-"))
        r = result["models"][name] = {"tokens_per_s": {}, "pct_of_roofline": {}}
        if name == "embedded":
            from nxc.model.checkpoint import load_nextchat
            model, tokenizer = load_nextchat(tok_dir)
        else:
            model, tokenizer = tinyllama_model(), SentencePieceOracle.from_dir(tok_dir)
        log(f"{name}: torch decode")
        r["tokens_per_s"]["torch"] = torch_decode(model, a.prompt_tokens, a.steps)
        for prec in precisions:
            log(f"{name}: nxc export {prec}")
            graphs = ("llm",) if name == "1b" else ("vision", "llm", "loc_heads", "sam_encoder", "sam_decoder")
            build = export_model(model, tokenizer, work / f"nxc-{prec}", tokenizer_dir=tok_dir, embedded=True,
                                 options=ExportOptions(precision=prec, graphs=graphs, parity=False,
                                                       calib_samples=4, block_size=a.block_size,
                                                       max_context=max(512, a.prefill_tokens + 8,
                                                                       a.prompt_tokens + a.steps + 8)),
                                 source={"checkpoint": "embedded:shapes-nextchat" if name == "embedded" else "random"})
            r["tokens_per_s"][f"nxc_{prec}"] = nxc_decode(build, a.prompt_tokens, a.steps)
            r["pct_of_roofline"][f"nxc_{prec}"] = 100 * step_bytes(build, a.prompt_tokens, a.steps) * \
                r["tokens_per_s"][f"nxc_{prec}"] / 1e9 / bw
            if llama is not None and prec in llama_cpp.QUANTS:
                log(f"{name}: nxc {prec} prefill of {a.prefill_tokens} rows")
                r.setdefault("prefill_tokens_per_s", {})[f"nxc_{prec}"] = nxc_prefill(build, a.prefill_tokens)
                kind = llama_cpp.QUANTS[prec]
                try:
                    log(f"{name}: llama.cpp {kind}")
                    q = llama_cpp.gguf(llama, hf_folder(model, work), work / "gguf", prec,
                                       log=lambda m: log(f"llama.cpp: {m}"))
                    lb = llama_cpp.bench(llama, q, threads=os.cpu_count(), depth=a.prompt_tokens, n_gen=a.steps,
                                         n_prompt=a.prefill_tokens, log=lambda m: log(f"llama.cpp: {m}"))
                    r.setdefault("llama_cpp", {})[kind] = lb
                    r["tokens_per_s"][f"llama_cpp_{kind}"] = lb["decode_tokens_per_s"]
                    r["prefill_tokens_per_s"][f"llama_cpp_{kind}"] = lb["prefill_tokens_per_s"]
                except llama_cpp.Unavailable as e:
                    r.setdefault("llama_cpp", {})[kind] = f"skipped: {e}"
            if prec == "fp32":
                r["pct_of_roofline"]["torch"] = r["pct_of_roofline"]["nxc_fp32"] * \
                    r["tokens_per_s"]["torch"] / r["tokens_per_s"]["nxc_fp32"]
                if name == "embedded":
                    log("embedded: end to end vs the reference")
                    r["end_to_end_fp32"] = end_to_end(build, a.e2e_runs)
        try:
            if a.skip_genai:
                raise ImportError("--skip-genai")
            import onnxruntime_genai  # noqa: F401
            for prec in [p for p in precisions if p in ("fp32", "int4")]:
                log(f"{name}: onnxruntime-genai {prec}")
                path = genai_build(model, work, prec)
                r["tokens_per_s"][f"genai_{prec}"] = genai_decode(path, model.config.llm.vocab_size,
                                                                  a.prompt_tokens, a.steps)
        except ImportError:
            r["genai"] = ("skipped: --skip-genai" if a.skip_genai else
                          "onnxruntime-genai is not installed (pip install onnxruntime-genai)")
        except RuntimeError as e:
            r["genai"] = str(e)
        t, pf = r["tokens_per_s"], r.get("prefill_tokens_per_s", {})
        r["ratios"] = {k: v for k, v in {
            "nxc_fp32_vs_torch": t["nxc_fp32"] / t["torch"] if "nxc_fp32" in t else None,
            "nxc_int4_vs_nxc_fp32": t["nxc_int4"] / t["nxc_fp32"] if {"nxc_int4", "nxc_fp32"} <= set(t) else None,
            **{f"nxc_{p}_decode_vs_llama_cpp_{q}": t[f"nxc_{p}"] / t[f"llama_cpp_{q}"]
               for p, q in (llama_cpp.QUANTS.items() if llama is not None else ()) if f"llama_cpp_{q}" in t},
            **{f"nxc_{p}_prefill_vs_llama_cpp_{q}": pf[f"nxc_{p}"] / pf[f"llama_cpp_{q}"]
               for p, q in (llama_cpp.QUANTS.items() if llama is not None else ()) if f"llama_cpp_{q}" in pf},
            "nxc_fp32_vs_genai_fp32": t["nxc_fp32"] / t["genai_fp32"] if {"genai_fp32", "nxc_fp32"} <= set(t) else None,
            "nxc_int4_vs_genai_int4": t["nxc_int4"] / t["genai_int4"] if {"genai_int4", "nxc_int4"} <= set(t) else None
        }.items()
            if v is not None}
        del model
        gc.collect()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
