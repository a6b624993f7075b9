"""Batched decoding on this machine (issue 18): one llm step for B rows against B batch-1 steps, and turns served
one at a time against the continuous-batching scheduler.

    python benchmarks/batch_decode.py [--build DIR] [--batches 1 2 4 8 16] [--past 600] [--steps 20] [--turns 16]

Part 1, the graph contract: with every row `past` positions deep (random K/V), the median time of
  - `batch1`: B steps of OrtRunner.run_cached, one row each (what nxc did before: one step per request);
  - `slots`: one OrtRunner.run_rows step of a BatchCache with B rows (stride = past rounded up to 128, masked);
  - `slots_full`: the same with the stride at the build's whole context (every row attends max_context
    positions, masked): what binding one [B, capacity] buffer would cost without the growing stride.
  tokens/s = B / step time. Part 2, end to end: `--turns` shapes prompts answered by Pipeline.chat one after the
  other and by a Batcher with max_batch B (greedy; same answers, checked), wall time and generated tokens/s.
Default build: the embedded model exported fp32 to a temporary directory. Prints JSON; progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _filled(pipe, slots: int, past: int, stride: int | None):
    _, c = pipe.batch_rows(slots, what="this benchmark", instead="use the onnxruntime backend on CPU")
    c.reserve(stride or past + 1)
    rng = np.random.default_rng(0)
    for name, buf in c.buffers.items():
        buf[:, :past] = rng.standard_normal(buf[:, :past].shape).astype(buf.dtype) * 0.1
    c.lengths[:] = past
    return c


def step_times(pipe, batches, past: int, steps: int) -> list[dict]:
    from nxc import names
    runner = pipe.runner(names.GRAPH_LLM)
    h = pipe.config.llm.hidden_size
    out = []
    for b in batches:
        x = np.random.default_rng(1).standard_normal((b, 1, h)).astype(np.float32) * 0.02
        row = {"batch": b}
        for kind in ("batch1", "slots", "slots_full"):
            times = []
            for _ in range(steps):
                if kind == "batch1":
                    caches = [_filled(pipe, 1, past, None) for _ in range(b)]
                    views = []
                    for c in caches:
                        v = c.open(0)
                        c.lengths[0] = past
                        views.append(v)
                    t0 = time.perf_counter()
                    for i, v in enumerate(views):
                        runner.run_cached(x[i:i + 1], v)
                else:
                    c = _filled(pipe, b, past, pipe.manifest.max_context if kind == "slots_full" else None)
                    t0 = time.perf_counter()
                    runner.run_rows(x, c, b)
                times.append(time.perf_counter() - t0)
            ms = float(np.median(times) * 1000)
            row[kind] = {"step_ms": round(ms, 2), "tokens_per_s": round(b / ms * 1000, 1)}
        row["speedup_slots_vs_batch1"] = round(row["batch1"]["step_ms"] / row["slots"]["step_ms"], 2)
        log(f"[batch-decode] B={b}: {json.dumps(row)}")
        out.append(row)
    return out


def end_to_end(pipe, turns: int, max_batch: int, max_new: int) -> dict:
    from nxc.runtime.batch import Batcher
    from nxc.shapes.data import make_sample, make_scene
    rng = np.random.default_rng(3)
    prompts = []
    for k in range(turns):
        task = ("rec", "caption", "pope", "region")[k % 4]
        s = make_sample(rng, task, make_scene(rng))
        prompts.append((s.image, s.question, s.boxes_in or None))
    t0 = time.perf_counter()
    alone = [pipe.chat(img, q, boxes=b, max_new_tokens=max_new) for img, q, b in prompts]
    t_alone = time.perf_counter() - t0
    batcher = Batcher(pipe, max_batch=max_batch, max_queue=turns)
    t0 = time.perf_counter()
    handles = [batcher.submit(pipe.conversation(img), q, boxes=b, max_new_tokens=max_new) for img, q, b in prompts]
    together = [h.result() for h in handles]
    t_batched = time.perf_counter() - t0
    stats = batcher.stats()
    batcher.close()
    same = sum(a.token_ids == b.token_ids for a, b in zip(alone, together))
    tokens = sum(len(r.token_ids) for r in alone)
    return {"turns": turns, "max_batch": max_batch, "generated_tokens": tokens, "same_answers": f"{same}/{turns}",
            "one_at_a_time_s": round(t_alone, 2), "batched_s": round(t_batched, 2),
            "one_at_a_time_tokens_per_s": round(tokens / t_alone, 1),
            "batched_tokens_per_s": round(tokens / t_batched, 1),
            "mean_rows_per_step": round(stats["mean_rows_per_step"], 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", help="build directory (default: the embedded model exported fp32)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--past", type=int, default=600, help="positions cached in every row (600: a prompt's image)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--turns", type=int, default=16, help="end-to-end turns (0: only the step timings, e.g. for a "
                                                               "build with the llm graph alone)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int)
    a = ap.parse_args(argv)
    from nxc.runtime.pipeline import Pipeline
    with tempfile.TemporaryDirectory() as tmp:
        build = a.build
        if build is None:
            from nxc.export.exporter import ExportOptions, export_build
            log("[batch-decode] exporting the embedded model (fp32)")
            build = export_build(None, Path(tmp) / "fp32", options=ExportOptions())
        pipe = Pipeline.load(build, threads=a.threads)
        past = min(a.past, pipe.manifest.max_context - 2)
        res = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {platform.processor() or '?'}",
               "build": str(build), "precision": pipe.manifest.precision, "past": past,
               "max_context": pipe.manifest.max_context, "steps": step_times(pipe, a.batches, past, a.steps)}
        if a.turns:
            log("[batch-decode] end to end")
            res["end_to_end"] = end_to_end(pipe, a.turns, max(a.batches), a.max_new_tokens)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
