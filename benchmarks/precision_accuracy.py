"""Accuracy of each precision on the embedded model, through the runtime on CPU, versus the fp32 build.

    python benchmarks/precision_accuracy.py [--n-per-task 500] [--builds build/fp32 build/fp16 build/int8 build/int4]

Exports any missing build of the embedded model, runs the nxc-eval held-out set (seed 1234) through each, and
prints JSON: the metrics per build, the change against fp32 in points, and the share of greedy replies whose
token ids are identical to the fp32 build's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-per-task", type=int, default=500)
    ap.add_argument("--builds", nargs="+", default=["build/fp32", "build/fp16", "build/int8", "build/int4"])
    a = ap.parse_args(argv)
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.manifest import BuildError, load_manifest
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.evaluate import evaluate

    results, ids = {}, {}
    for b in a.builds:
        path = Path(b)
        try:
            load_manifest(path)
        except BuildError:
            export_build(None, path, options=ExportOptions(precision=path.name if path.name in
                                                            ("fp32", "fp16", "int8", "int4") else "fp32"))
        pipe = Pipeline.load(path)
        said: list[list[int]] = []

        def chat(image, text, boxes, pipe=pipe, said=said):
            r = pipe.chat(image, text, boxes=boxes, max_new_tokens=48, iou_threshold=None)
            said.append(r.token_ids)
            return r

        print(f"evaluating {b} ...", file=sys.stderr, flush=True)
        m = evaluate(chat, n_per_task=a.n_per_task, progress=False)
        results[b], ids[b] = m, said
    base = a.builds[0]
    flat = lambda m: {f"{t}.{k}": v for t, d in m.items() if t != "meta" for k, v in d.items() if k != "n"}  # noqa: E731
    out = {"reference_build": base, "n_per_task": a.n_per_task, "builds": {}}
    for b in a.builds:
        delta = {k: round(100 * (v - flat(results[base])[k]), 2) for k, v in flat(results[b]).items()}
        same = sum(x == y for x, y in zip(ids[b], ids[base])) / len(ids[base])
        out["builds"][b] = {"metrics": flat(results[b]), "points_vs_reference": delta,
                            "token_identical_replies": same, "seconds": results[b]["meta"]["seconds"]}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
