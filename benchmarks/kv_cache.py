"""Decode-step time vs past length for the two llm KV-cache designs (nxc.export.llm), embedded model, ORT CPU.

    python benchmarks/kv_cache.py [--runs 200] [--pasts 16 256 1024]

Prints JSON: per mode, the median step time (ms) at each past length and the ratio to the shortest one.
"inplace" (what nxc ships): the graph returns only the new K/V row and the runtime writes it into its
preallocated buffer; "concat": the graph returns past+new, copying the cache every step.
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


def step_times(build: Path, pasts: list[int], runs: int, mode: str) -> dict:
    import onnxruntime as ort

    from nxc import names
    from nxc.manifest import load_manifest
    from nxc.runtime.kv_cache import KVCache

    m = load_manifest(build)
    llm = m.data["config"]["llm"]
    kv, d = llm["num_kv_heads"], llm["hidden_size"] // llm["num_heads"]
    spec = m.graph_spec(names.GRAPH_LLM)
    so = ort.SessionOptions()
    so.intra_op_num_threads = os.cpu_count() or 1
    sess = ort.InferenceSession(str(m.graph_path(names.GRAPH_LLM)), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, llm["hidden_size"])).astype(np.float32)
    out = {}
    for p in pasts:
        cache = KVCache(num_layers=llm["num_layers"], num_kv_heads=kv, head_dim=d, capacity=max(pasts) + 1)
        fill = {n: rng.standard_normal((1, p, kv, d)).astype(np.float32) for n in spec.input_names[3:]}
        cache.append({n.replace("past_key_values", "present"): v for n, v in fill.items()})
        feeds = {"inputs_embeds": x, "attention_mask": np.ones((1, p + 1), np.int64),
                 "position_ids": np.array([[p]], np.int64)}
        times = []
        # IO binding with OrtValues over numpy memory: what the runtime does (sess.run would copy the inputs)
        io = sess.io_binding()
        for k, v in feeds.items():
            io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v))
        for o in spec.output_names:
            io.bind_output(o)
        for i in range(runs + 10):
            t0 = time.perf_counter()
            if mode == "inplace":
                for k, v in cache.past().items():
                    io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v))
                sess.run_with_iobinding(io)
                res = io.get_outputs()
                cache.append({n: r.numpy() for n, r in zip(spec.output_names, res) if n.startswith("present")})
                cache.truncate(p)
            else:   # the runtime would bind the returned past+new OrtValues as the next past (no host copy)
                for k, v in fill.items():
                    io.bind_ortvalue_input(k, ort.OrtValue.ortvalue_from_numpy(v))
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
        for mode in ("inplace", "concat"):
            build = export_build(None, Path(tmp) / mode, options=ExportOptions(graphs=("llm",), kv_mode=mode))
            print(f"timing {mode} ...", file=sys.stderr, flush=True)
            result[mode] = step_times(build, a.pasts, a.runs, mode)
    import onnxruntime
    result["onnxruntime"] = onnxruntime.__version__
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
