"""What an export says as it goes: its progress lines' pieces, and the fp16 build's accuracy against fp32
(reports/accuracy.json; int8 / int4 measure theirs in nxc.export.quantized)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from nxc.specs import graph_specs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def lint_summary(findings: dict) -> str:
    """A graph's TensorRT lint in its progress line (the manifest records all of it)."""
    if findings["ok"]:
        return "TensorRT lint ok"
    n = findings["problem_count"]
    more = f" (+{n - 1} more in the manifest)" if n > 1 else ""
    return f"TensorRT lint: {n} problem(s): {findings['problems'][0]}{more}"


def peak() -> str:
    """", peak RSS so far x GB" for a progress line (ru_maxrss of this process: what a machine must have)."""
    import resource
    return f", peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.1f} GB"


def graph_mb(tmp: Path, record: dict) -> float:
    """Megabytes of a graph's files (the .onnx and its external data) in the partial build `tmp`."""
    return sum((tmp / f).stat().st_size for f in [record["file"], *record["external_data"]]) / 1e6


def accuracy_vs_fp32(reference: Path, tmp: Path, graphs: dict, cfg, *, sam_size: int) -> dict:
    """Per graph: cosine similarity and max abs error of the build's graph against fp32 (the graphs in
    `reference`), on fresh random inputs at the parity shapes. `sam_size`: the SAM input side (0 without SAM)."""
    from nxc.calib.quantize import compare_graphs
    from nxc.export.parity import SHAPES, random_inputs
    report = {"reference": "fp32 graphs of the same model, fresh random inputs", "graphs": {}}
    for g in graphs:
        if not (reference / f"{g}.onnx").is_file():
            continue
        spec = graph_specs(cfg)[g]                                   # float32 feeds; compare_graphs casts per graph
        feeds = [random_inputs(spec, {**a, "batch": 1}, np.random.default_rng(100 + i), sam_size=sam_size)
                 for i, a in enumerate(SHAPES)]
        report["graphs"][g] = compare_graphs(reference / f"{g}.onnx", tmp / graphs[g]["file"], feeds)
        worst = min(v["cosine"] for v in report["graphs"][g].values())
        log(f"[nxc-export] {g}: cosine vs fp32 >= {worst:.5f}")
    return report
