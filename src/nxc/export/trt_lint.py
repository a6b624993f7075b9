"""TensorRT readiness lint: does every node and tensor of a graph fall inside what TensorRT's ONNX parser takes?

The table is data (`data/tensorrt_onnx_ops.json`, with its sources). The lint is static: it cannot prove an
engine builds (only `nxc-build` on a GPU can), but it catches the usual blockers before anyone reaches a device:
custom-domain ops (com.microsoft contrib ops), operators missing from the parser, tensor types it lacks, an opset
newer than the table, and the restrictions that are checkable statically (axes / weights that must be constants).
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import onnx

_CONST_INPUT = {   # op -> (input index, what it is) that the parser needs as an initializer / constant
    "Conv": (1, "weights"), "ConvTranspose": (1, "weights"), "Slice": (3, "axes"), "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"), "TopK": (1, "K"), "CumSum": (1, "axis"),
}


@lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(resources.files("nxc.export").joinpath("data/tensorrt_onnx_ops.json").read_text())


def lint(model: onnx.ModelProto) -> dict:
    """Findings for one graph: {"ok", "ops" (used op -> count), "problems" [str], "min_tensorrt", "source"}."""
    t = table()
    ops_ok = t["operators"]
    types_ok = set(t["types"])
    g = model.graph
    problems: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > t["max_opset"]:
        problems.append(f"opset {opset} is newer than the table's {t['max_opset']}")
    consts = {i.name for i in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
    counts: dict[str, int] = {}
    for n in g.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        counts[key] = counts.get(key, 0) + 1
        if n.domain not in ("", "ai.onnx"):
            problems.append(f"node {n.name or n.op_type}: custom-domain op {key} is not parsed by TensorRT")
        elif n.op_type not in ops_ok:
            problems.append(f"node {n.name or n.op_type}: operator {n.op_type} is not supported by TensorRT's parser")
        elif n.op_type in _CONST_INPUT:
            idx, what = _CONST_INPUT[n.op_type]
            if len(n.input) > idx and n.input[idx] and n.input[idx] not in consts:
                problems.append(f"node {n.name or n.op_type}: {n.op_type} {what} must be a constant")
    values = list(g.input) + list(g.output) + list(g.value_info)
    for v in values:
        elem = v.type.tensor_type.elem_type
        if elem and onnx.TensorProto.DataType.Name(elem) not in types_ok:
            problems.append(f"tensor {v.name}: type {onnx.TensorProto.DataType.Name(elem)} is not a TensorRT type")
    for init in g.initializer:
        if onnx.TensorProto.DataType.Name(init.data_type) not in types_ok:
            problems.append(f"initializer {init.name}: type {onnx.TensorProto.DataType.Name(init.data_type)} "
                            "is not a TensorRT type")
    return {"ok": not problems, "ops": dict(sorted(counts.items())), "problems": problems[:50],
            "problem_count": len(problems), "min_tensorrt": t["min_tensorrt"], "source": t["sources"][0]}
