"""A graph's files on disk, handled one tensor at a time (STYLE 15: weights stream; graphs are data).

    torch.onnx.export's output (weights inline under 2 GB, one file per tensor over it)
        ─ onnx.load(load_external_data=False) ─▶ structure  (+ inline weights, when torch wrote them inline)
        ─ write_weights ─▶ <g>.onnx.data: each initializer's bytes appended in graph order, copied file to file or
                           taken from the proto and cleared ─▶ onnx.save_model(structure) ─▶ <g>.onnx
The result is byte for byte what onnx.save_model(save_as_external_data=True, all_tensors_to_one_file=True,
location=<g>.onnx.data, size_threshold=1024) writes for the fully loaded graph, without ever loading it.
"""
from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import onnx
from onnx import TensorProto
from onnx.external_data_helper import ExternalDataInfo, load_external_data_for_tensor, uses_external_data

SIZE_THRESHOLD = 1024                   # onnx.save_model's default: tensors this large (sys.getsizeof) go external
_BYTES_OVERHEAD = sys.getsizeof(b"")    # what sys.getsizeof adds to a bytes object's length
_CHUNK = 64 << 20


def tensors(graph: onnx.GraphProto, *, initializers: bool) -> Iterator[TensorProto]:
    """A graph's initializers (or its nodes' tensor attributes), then its subgraphs', in onnx.external_data_helper's
    order (the order onnx.save_model writes external data in)."""
    if initializers:
        yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if not initializers:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
            for sub in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from tensors(sub, initializers=initializers)


def data_bytes(t: TensorProto, base: Path) -> int:
    """Bytes of a tensor's data: its raw_data, or its span of an external file resolved in `base`; -1 for a tensor
    whose data is in typed fields (float_data, int64_data...), which onnx never moves to external data."""
    if uses_external_data(t):
        info = ExternalDataInfo(t)
        if info.length is not None:
            return int(info.length)
        return (base / info.location).stat().st_size - int(info.offset or 0)
    return len(t.raw_data) if t.HasField("raw_data") else -1


def weight_bytes(model: onnx.ModelProto, base: Path) -> int:
    """Bytes of the top-level initializers as a fully loaded graph would hold them (ByteSize plus external data)."""
    return sum(t.ByteSize() + (data_bytes(t, base) if uses_external_data(t) else 0) for t in model.graph.initializer)


def _copy(src: Path, offset: int, n: int, out) -> None:
    with open(src, "rb") as f:
        f.seek(offset)
        while n > 0:
            block = f.read(min(n, _CHUNK))
            if not block:
                raise OSError(f"{src} ends {n} bytes before the tensor it holds")
            out.write(block)
            n -= len(block)


def write_weights(model: onnx.ModelProto, src: Path, data: Path | None) -> None:
    """Make `model` (loaded without external data from folder `src`) self-contained for saving beside `data`.

    data given: every initializer of SIZE_THRESHOLD bytes or more is appended to `data` in graph order and pointed
    at it (location = data's file name, offset, length); smaller ones and tensor attributes are inline.
    data None: everything inline. A tensor's bytes are in memory at most once: inline ones are written and cleared,
    external ones copied from `src` in chunks of 64 MiB."""
    out = open(data, "wb") if data is not None else None
    try:
        for t in tensors(model.graph, initializers=True):
            n = data_bytes(t, src)
            if out is None or n < 0 or n + _BYTES_OVERHEAD < SIZE_THRESHOLD:
                if uses_external_data(t):
                    load_external_data_for_tensor(t, str(src))
                continue
            offset = out.tell()
            if uses_external_data(t):
                info = ExternalDataInfo(t)
                _copy(src / info.location, int(info.offset or 0), n, out)
            else:
                out.write(t.raw_data)
                t.ClearField("raw_data")
            del t.external_data[:]
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data.name), ("offset", str(offset)), ("length", str(n))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
    finally:
        if out is not None:
            out.close()
    for t in tensors(model.graph, initializers=False):
        if uses_external_data(t):
            load_external_data_for_tensor(t, str(src))


def graph_record(path: Path, spec, precision: str, opset: int, external: list[str]) -> dict:
    """A graph's manifest record as exported to `path` (<build>/graphs/<g>.onnx, `external` its data files beside
    it): file and external data relative to the build, precision, opset, I/O spec, and the TensorRT lint of its
    structure (read without its weights)."""
    from nxc.export.trt_lint import lint
    return {"file": f"graphs/{path.name}", "external_data": [f"graphs/{e}" for e in external],
            "precision": precision, "opset": opset, **spec.to_dict(),
            "tensorrt_lint": lint(onnx.load(str(path), load_external_data=False))}
