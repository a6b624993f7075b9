"""End to end, text-only, the runtime vs the PyTorch reference on the same TinyLlama-sized NExT-Chat weights (random,
built here; vision at the embedded model's size). Random weights never emit a trigger, so this is the text path:
preprocess, vision, prefill of the whole prompt (image rows included), greedy decode. The vocabulary is the embedded
model's tokenizer's (787 instead of 32005: the runtime decodes every generated id to text, and random weights
would produce ids that tokenizer lacks), so the LLaMA body is TinyLlama's and the model has 0.97 B parameters.

    python benchmarks/e2e_1b.py [--runs 3] [--max-new-tokens 32]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    a = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).parent))
    from precision import tinyllama_model

    from nxc.assets import embedded_checkpoint
    from nxc.export.exporter import ExportOptions, export_model
    from nxc.model.reference import ReferenceChat
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.data import make_scene

    tok_dir = embedded_checkpoint()
    tokenizer = SentencePieceOracle.from_dir(tok_dir)
    model = tinyllama_model(vocab_size=tokenizer.vocab_size)
    work = Path(tempfile.mkdtemp(prefix="nxc-e2e-1b-"))
    build = export_model(model, tokenizer, work / "fp32", tokenizer_dir=tok_dir, embedded=True,
                         options=ExportOptions(graphs=("vision", "llm"), parity=False, max_context=512),
                         source={"checkpoint": "benchmark: random weights"})
    pipe, ref = Pipeline.load(build), ReferenceChat(model=model, tokenizer=tokenizer)
    image = make_scene(np.random.default_rng(7)).image
    prompt = "Is there a red circle in the image?"
    ours, theirs, same = [], [], True
    for i in range(a.runs + 1):
        t0 = time.perf_counter()
        r = pipe.chat(image, prompt, max_new_tokens=a.max_new_tokens)
        t1 = time.perf_counter()
        q = ref.chat(image, prompt, max_new_tokens=a.max_new_tokens)
        t2 = time.perf_counter()
        same &= r.token_ids == q.token_ids
        if i:
            ours.append(t1 - t0)
            theirs.append(t2 - t1)
        print(f"[bench] run {i}: nxc {t1 - t0:.2f} s, torch {t2 - t1:.2f} s", file=sys.stderr, flush=True)
    o, t = float(np.median(ours)), float(np.median(theirs))
    print(json.dumps({"prompt_tokens": len(r.prompt_ids), "new_tokens": len(r.token_ids), "same_token_ids": same,
                      "nxc_s": o, "torch_s": t, "speedup_vs_torch": t / o, "runs": a.runs}, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
