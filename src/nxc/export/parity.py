"""Every export ends with a check run: each graph in ONNX Runtime against its torch wrapper, on fresh random
inputs at two shapes. The result goes to reports/parity.json in the build; a graph that cannot run fails the
export loudly.
"""
from __future__ import annotations

import numpy as np
import torch

from nxc.specs import GraphSpec

# (axis lengths) per check; the two shapes differ in every dynamic axis a graph has
SHAPES = ({"batch": 1, "sequence": 5, "past": 0, "detections": 1, "boxes": 2},
          {"batch": 2, "sequence": 1, "past": 7, "detections": 3, "boxes": 1})
# |ort - torch| <= atol * max(1, max|torch|) + rtol * |torch|: fp16 rounding is relative to the tensor's scale
TOLERANCE = {"fp32": {"rtol": 1e-4, "atol": 1e-4}, "fp16": {"rtol": 1e-2, "atol": 1e-2}}


def random_inputs(spec: GraphSpec, axes: dict[str, int], rng: np.random.Generator, *,
                  sam_size: int = 1024) -> dict[str, np.ndarray]:
    """Inputs that respect each tensor's meaning: masks of ones, consecutive positions, valid boxes."""
    axes = {**axes, "total": axes.get("past", 0) + axes.get("sequence", 1)}
    feeds = {}
    for t in spec.inputs:
        shape = t.resolve(axes)
        if t.name == "attention_mask":
            x = np.ones(shape, np.int64)
        elif t.name == "position_ids":
            x = np.broadcast_to(np.arange(axes["past"], axes["past"] + shape[1], dtype=np.int64), shape).copy()
        elif t.name == "boxes":
            xy = np.sort(rng.uniform(0, 1, (shape[0], 2, 2)), axis=1)      # [K, corner, (x,y)]: x1<x2, y1<y2
            x = xy.reshape(shape[0], 4)                                      # x1 y1 x2 y2
            x = (x * (sam_size if spec.name == "sam_decoder" else 1)).astype(np.float32)
        else:
            x = rng.standard_normal(shape).astype(t.dtype)
        feeds[t.name] = x
    return feeds


def compare(torch_out: list[np.ndarray], ort_out: list[np.ndarray], names: list[str], precision: str) -> dict:
    tol = TOLERANCE[precision]
    out, ok = {}, True
    for name, a, b in zip(names, torch_out, ort_out):
        if a.shape != b.shape:
            out[name] = {"ok": False, "error": f"shape {b.shape} from ONNX Runtime, {a.shape} from torch"}
            ok = False
            continue
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        err = np.abs(a64 - b64)
        scale = max(1.0, float(np.abs(a64).max())) if a64.size else 1.0
        close = bool(np.all(err <= tol["atol"] * scale + tol["rtol"] * np.abs(a64)))
        ok &= close
        out[name] = {"ok": close, "max_abs": float(err.max()) if err.size else 0.0,
                     "max_rel": float((err / (np.abs(a64) + 1e-6)).max()) if err.size else 0.0}
    return {"ok": ok, "outputs": out, **tol}


def check_graph(wrapper: torch.nn.Module, onnx_path, spec: GraphSpec, *, precision: str = "fp32",
                seed: int = 0, sam_size: int = 1024, shapes=SHAPES) -> dict:
    import onnxruntime as ort
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    report = {"ok": True, "checks": []}
    for axes in shapes:
        if spec.name in ("sam_encoder", "sam_decoder", "loc_heads"):
            axes = {**axes, "batch": 1}
        feeds = random_inputs(spec, axes, rng, sam_size=sam_size)
        with torch.no_grad():
            ref = wrapper(*[torch.from_numpy(feeds[n]) for n in spec.input_names])
        ref = [r.numpy() for r in (ref if isinstance(ref, (tuple, list)) else (ref,))]
        got = sess.run(spec.output_names, feeds)
        res = compare(ref, got, spec.output_names, precision)
        res["axes"] = {k: v for k, v in axes.items() if any(k in t.shape for t in spec.inputs + spec.outputs)}
        report["checks"].append(res)
        report["ok"] &= res["ok"]
    return report
