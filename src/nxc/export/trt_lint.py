"""TensorRT readiness lint: does every node and tensor of a graph fall inside what TensorRT's ONNX parser takes?

The table is data (`data/tensorrt_onnx_ops.json`, with its sources). The lint is static: it cannot prove an
engine builds (only `nxc-build` on a GPU can), but it catches the usual blockers before anyone reaches a device:
custom-domain ops (com.microsoft contrib ops), operators missing from the parser, tensor types it lacks, an opset
newer than the table, and the restrictions that are checkable statically (axes / weights that must be constants).

A graph over 1 GB keeps its weights in a data file beside it (ONNX external data: each tensor names the file and
its offset). TensorRT finds that file only when it parses the graph from its path (OnnxParser.parse_from_file, as
nxc-build does; parse(bytes) without a path cannot), and only where the location is a plain file name in the
graph's own directory: the lint records the files, and an absolute or `..` location is a problem. A .onnx over
protobuf's 2 GB limit cannot be parsed at all.
"""
from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import PurePosixPath, PureWindowsPath

import onnx

_CONST_INPUT = {   # op -> (input index, what it is) that the parser needs as an initializer / constant
    "Conv": (1, "weights"), "ConvTranspose": (1, "weights"), "Slice": (3, "axes"), "Squeeze": (1, "axes"),
    "Unsqueeze": (1, "axes"), "TopK": (1, "K"), "CumSum": (1, "axis"),
}
PROTOBUF_LIMIT = 2 ** 31 - 1          # bytes: the largest serialized ModelProto protobuf (and TensorRT) reads
EXTERNAL_DATA_NOTE = ("weights in external data: TensorRT must parse this graph from its file "
                      "(OnnxParser.parse_from_file, as nxc-build does) so that the data file beside it is found")


@lru_cache(maxsize=1)
def table() -> dict:
    return json.loads(resources.files("nxc.export").joinpath("data/tensorrt_onnx_ops.json").read_text())


def _stored_tensors(graph: onnx.GraphProto):
    """Initializers and Constant-node tensors, subgraphs included: every tensor that can hold weights."""
    yield from graph.initializer
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.TENSOR:
                yield a.t
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
                yield from _stored_tensors(sub)


def _plain_file_name(location: str) -> bool:
    path = PurePosixPath(location)
    return (bool(location) and not path.is_absolute() and not PureWindowsPath(location).is_absolute()
            and "\\" not in location and len(path.parts) == 1 and location not in (".", ".."))


def external_data(model: onnx.ModelProto) -> tuple[dict | None, list[str]]:
    """({"files", "tensors", "bytes", "note"} or None when every weight is inside the .onnx, problems) of a graph
    loaded with load_external_data=False: the files must be plain names, resolved beside the .onnx."""
    files: dict[str, int] = {}
    problems: list[str] = []
    tensors = 0
    for t in _stored_tensors(model.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        tensors += 1
        files[loc] = files.get(loc, 0) + int(info.get("length") or 0)
        if not _plain_file_name(loc):
            problems.append(f"initializer {t.name}: external data location {loc!r} is not a plain file name in "
                            "the graph's folder (TensorRT and ONNX Runtime resolve it relative to the .onnx, and a "
                            "build is moved as one folder); re-export the graph")
    if not tensors:
        return None, problems
    record = {"files": sorted(files), "tensors": tensors, "bytes": sum(files.values()), "note": EXTERNAL_DATA_NOTE}
    return record, problems


def lint(model: onnx.ModelProto) -> dict:
    """Findings for one graph: {"ok", "ops" (used op -> count), "problems" [str], "problem_count", "min_tensorrt",
    "source"}, plus "external_data" ({"files", "tensors", "bytes", "note"}) when its weights are in data files.
    `model` as loaded with load_external_data=False (the .onnx alone)."""
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
    external, located = external_data(model)
    problems += located
    size = model.ByteSize()
    if size > PROTOBUF_LIMIT:
        problems.append(f"the .onnx itself is {size / 2 ** 30:.2f} GiB, over protobuf's 2 GiB limit: TensorRT cannot "
                        "parse it; write its weights as external data")
    found = {"ok": not problems, "ops": dict(sorted(counts.items())), "problems": problems[:50],
             "problem_count": len(problems), "min_tensorrt": t["min_tensorrt"], "source": t["sources"][0]}
    if external is not None:
        found["external_data"] = external
    return found
