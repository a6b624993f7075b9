"""Decode-step time vs past length for the two llm KV-cache designs (nxc.export.llm), embedded model, ORT CPU.

    python benchmarks/kv_cache.py [--runs 200] [--pasts 16 256 1024]

Prints JSON: per mode, the median step time (ms) at each past length and the ratio to the shortest one.
"inplace" (what nxc ships): the graph returns only the new K/V row and the runtime writes it into its
preallocated buffer; "concat": the graph returns past+new, copying the cache every step. No build has a concat
graph (the runtime reads only the inplace cache): this script exports that variant by itself, beside an llm-only
build whose manifest gives the sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def export_concat_llm(path: Path) -> Path:
    """The embedded model's llm graph with present = concat(past, new) at `path`, checked against its torch
    wrapper in ONNX Runtime as every export is."""
    from nxc import names
    from nxc.assets import embedded_checkpoint
    from nxc.export.exporter import ExportOptions, export_graph
    from nxc.export.llm import LlmGraph
    from nxc.export.parity import check_graph
    from nxc.model.checkpoint import load_nextchat
    from nxc.specs import graph_specs

    model, _ = load_nextchat(embedded_checkpoint())
    wrapper = LlmGraph(model, kv_mode="concat").eval()
    spec = graph_specs(model.config)[names.GRAPH_LLM]
    export_graph(wrapper, spec, model.config, path, ExportOptions(graphs=(names.GRAPH_LLM,)))
    parity = check_graph(wrapper, path, spec)
    if not parity["ok"]:
        raise RuntimeError(f"the concat llm graph does not match torch in ONNX Runtime: {parity['checks']}")
    return path


def step_times(build: Path, pasts: list[int], runs: int, mode: str, *, graph: Path | None = None) -> dict:
    """`graph`: an llm graph to time instead of the build's own (the concat one); the build gives the sizes."""
    import onnxruntime as ort

    from nxc import names
    from nxc.manifest import load_manifest
    from nxc.runtime.backends.ort import OrtRunner
    from nxc.runtime.kv_cache import KVCache

    m = load_manifest(build)
    llm = m.config.llm
    kv, d = llm.num_kv_heads, llm.head_dim
    spec = m.graph_spec(names.GRAPH_LLM)
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(graph or m.graph_path(names.GRAPH_LLM)), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, llm.hidden_size)).astype(np.float32)
    out = {}
    for p in pasts:
        fill = {n: rng.standard_normal((1, p, kv, d)).astype(np.float32) for n in spec.input_names[3:]}
        times = []
        if mode == "inplace":           # what the runtime does: past and present bound by address in the cache
            runner = OrtRunner(sess, spec)
            cache = KVCache(num_layers=llm.num_layers, num_kv_heads=kv, head_dim=d, capacity=max(pasts) + 1)
            for n, v in fill.items():
                cache.arrays_full()[n][:, :p] = v
            cache.advance(p)
        else:   # the runtime would bind the returned past+new OrtValues as the next past (no host copy)
            io = sess.io_binding()
            feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, p + 1), np.int64),
                     "position_ids": np.array([[p]], np.int64), **fill}
            for k, v in feeds.items():
                io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v))
            for o in spec.output_names:
                io.bind_output(o)
        for i in range(runs + 10):
            t0 = time.perf_counter()
            if mode == "inplace":
                runner.run_cached(x, cache)
                cache.truncate(p)
            else:
                sess.run_with_iobinding(io)
                io.get_outputs()
            if i >= 10:
                times.append(time.perf_counter() - t0)
        out[str(p)] = 1000 * float(np.median(times))
    base = out[str(min(pasts))]
    return {"ms": out, "ratio_to_shortest": {k: v / base for k, v in out.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--pasts", type=int, nargs="+", default=[16, 256, 1024])
    a = ap.parse_args(argv)
    from nxc.export.exporter import ExportOptions, export_build
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()}, "runs": a.runs}
    with tempfile.TemporaryDirectory() as tmp:
        build = export_build(None, Path(tmp) / "inplace", options=ExportOptions(graphs=("llm",)))
        concat = export_concat_llm(Path(tmp) / "concat" / "llm.onnx")
        for mode, graph in (("inplace", None), ("concat", concat)):
            print(f"timing {mode} ...", file=sys.stderr, flush=True)
            result[mode] = step_times(build, a.pasts, a.runs, mode, graph=graph)
    import onnxruntime
    result["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
