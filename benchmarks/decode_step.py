"""One llm decode step of the embedded model in ONNX Runtime (CPU): the working tree's llm export wrapper
(nxc.export.llm) against a committed one, in the same run.

    python benchmarks/decode_step.py [--baseline HEAD] [--pasts 64 512] [--steps 300] [--threads 1 2]

Both wrappers are exported from the same loaded model (each graph checked against its own torch wrapper, as every
export is); each decode step (one token after `past` cached positions) goes through OrtRunner.run_cached with the
pipeline's session options (nxc.runtime.backends.ort.OrtBackend.load: allow_spinning 0, intra-op threads as
given). The cases (wrapper, threads, past) take turns in shuffled rounds of a few consecutive steps each, so drift
of the machine hits all of them alike while each step finds its weights in the CPU caches, as in a decode loop.
Prints JSON: node counts (as exported and after ORT's graph optimizations), median ms per step (p10 / p90 beside
it) and the speed-up of the working tree over the baseline. Progress goes to stderr.
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def baseline_module(rev: str, scratch: Path):
    """nxc/export/llm.py as committed at `rev`, imported from a file of its own."""
    src = subprocess.run(["git", "show", f"{rev}:src/nxc/export/llm.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    path = scratch / "llm_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("nxc_llm_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def export_llm(module, model, path: Path) -> Path:
    from nxc import names
    from nxc.export.exporter import ExportOptions, export_graph
    from nxc.export.parity import check_graph
    from nxc.specs import graph_specs
    wrapper = module.LlmGraph(model).eval()
    spec = graph_specs(model.config)[names.GRAPH_LLM]
    export_graph(wrapper, spec, model.config, path, ExportOptions(graphs=(names.GRAPH_LLM,)))
    parity = check_graph(wrapper, path, spec)
    if not parity["ok"]:
        raise RuntimeError(f"{path}: the graph does not match its torch wrapper in ONNX Runtime: {parity['checks']}")
    return path


def node_counts(path: Path) -> dict:
    """Nodes as exported and as ONNX Runtime runs them (ORT_ENABLE_ALL, CPU), with the latter's op types."""
    import onnx
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.log_severity_level = 3                   # the "hardware specific optimizations" warning on saving
    so.optimized_model_filepath = str(path.with_suffix(".ort-optimized.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    raw, opt = onnx.load(str(path)), onnx.load(so.optimized_model_filepath)
    ops = collections.Counter(n.op_type for n in opt.graph.node)
    return {"exported": len(raw.graph.node), "optimized": len(opt.graph.node), "optimized_ops": dict(ops.most_common())}


def time_steps(graphs: dict[str, Path], spec, llm, *, pasts: list[int], threads: list[int], steps: int,
               block: int, warmup: int) -> dict:
    """Median / p10 / p90 ms of one decode step per (graph, threads, past). The cases take turns in shuffled
    rounds of `block` consecutive steps, the first 2 of each turn untimed: consecutive, because a decode loop runs
    the llm step after step with its weights in the CPU caches (one step per case in turn would time eviction)."""
    from nxc.runtime.backends.ort import OrtBackend
    from nxc.runtime.kv_cache import KVCache
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, llm.hidden_size)).astype(np.float32)
    fill = rng.standard_normal((1, max(pasts), llm.num_kv_heads, llm.head_dim)).astype(np.float32)
    cases = []                                  # (graph label, threads, past, runner, cache)
    for n in threads:
        backend = OrtBackend(threads=n)
        for label, path in graphs.items():
            runner = backend.load(path, spec)
            for p in pasts:
                cache = KVCache(num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads, head_dim=llm.head_dim,
                                capacity=p + 1, memory=backend.kv_memory)
                cache.advance(p)
                for buf in cache.arrays().values():
                    buf[...] = fill[:, :p]
                cases.append((label, n, p, runner, cache))

    def step(runner, cache, p) -> float:
        cache.truncate(p)
        t0 = time.perf_counter()
        runner.run_cached(x, cache)
        return (time.perf_counter() - t0) * 1e3

    for _, _, p, runner, cache in cases:
        for _ in range(warmup):
            step(runner, cache, p)
    skip = 2
    times = [[] for _ in cases]
    order = np.arange(len(cases))
    rounds = -(-steps // (block - skip))
    for r in range(rounds):
        rng.shuffle(order)
        for j in order:
            _, _, p, runner, cache = cases[j]
            times[j] += [step(runner, cache, p) for _ in range(block)][skip:]
        if (r + 1) % 10 == 0:
            log(f"  round {r + 1}/{rounds}")
    out: dict = {}
    for (label, n, p, _, _), t in zip(cases, times):
        q10, q50, q90 = np.percentile(t[:steps], [10, 50, 90])
        out.setdefault(f"threads={n}", {}).setdefault(f"past={p}", {})[label] = {
            "median_ms": round(float(q50), 4), "p10_ms": round(float(q10), 4), "p90_ms": round(float(q90), 4)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="HEAD", help="git revision whose nxc/export/llm.py is the baseline")
    ap.add_argument("--pasts", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--block", type=int, default=12, help="consecutive steps per turn (the first 2 untimed)")
    ap.add_argument("--warmup", type=int, default=30, help="untimed steps per case before the rounds")
    a = ap.parse_args(argv)

    import onnxruntime
    import torch

    import nxc.export.llm as current
    from nxc import names
    from nxc.assets import embedded_checkpoint
    from nxc.model.checkpoint import load_nextchat
    from nxc.specs import graph_specs

    torch.set_num_threads(1)
    model, _ = load_nextchat(embedded_checkpoint())
    spec = graph_specs(model.config)[names.GRAPH_LLM]
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
              "onnxruntime": onnxruntime.__version__, "baseline": a.baseline, "steps": a.steps}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        graphs = {}
        for label, module in (("baseline", baseline_module(a.baseline, tmp)), ("working_tree", current)):
            log(f"exporting the {label} llm ...")
            graphs[label] = export_llm(module, model, tmp / label / "llm.onnx")
        result["nodes"] = {label: node_counts(path) for label, path in graphs.items()}
        log(f"timing {a.steps} decode steps per case, interleaved ...")
        ms = time_steps(graphs, spec, model.config.llm, pasts=a.pasts, threads=a.threads, steps=a.steps,
                        block=a.block, warmup=a.warmup)
    for per_past in ms.values():
        for row in per_past.values():
            row["speedup"] = round(row["baseline"]["median_ms"] / row["working_tree"]["median_ms"], 3)
    result["decode_step"] = ms
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
