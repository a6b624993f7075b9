"""The `projector` graph: NExT-GPT's output projector (nxc.model.nextgpt_projector) exported, checked and linted.

    OutputProjector ─ ProjectorGraph (its transformer written out) ─ export_graph ─▶ graphs/projector.onnx
      fp32: ─ TensorRT lint ─ ORT parity vs the module itself at batch 1 and 2 (parity.TOLERANCE, 1e-4 at fp32)
      fp16: fp32 graph to scratch (the accuracy reference) ─ to_fp16(copy), Float32IO ─▶ graphs/projector.onnx
            ─ lint ─ parity vs the fp16 torch module ─ cosine / max error vs the fp32 graph
      int8: fp32 graph to scratch, parity ─ quantize_weights_int8 (weights int8 per output channel behind
            DequantizeLinear, float activations, as loc_heads) ─▶ graphs/projector.onnx ─ lint ─ accuracy vs fp32
The single-graph steps are the exporter's own (export_graph, trt_lint.lint, parity.check_graph, fp16.to_fp16,
calib.quantize); this module only strings them together for a graph whose sizes are a ProjectorSizes.
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nxc import names
from nxc.config import ProjectorSizes
from nxc.export.outdir import ExportError
from nxc.export.reports import log as _log
from nxc.specs import projector_spec

PRECISIONS = ("fp32", "fp16", "int8", "int4")     # int4 builds get the int8 weight-only projector, as loc_heads
ACCURACY_SEED = 100                               # accuracy feeds: fresh random inputs, not the parity check's


class ProjectorGraph(nn.Module):
    """hidden [B,N,H] (the signal tokens' final-norm hiddens), embeds [B,N,H] (their embedding rows)
    -> conditioning [B,Q,D]. The export wrapper: the projector's nn.Transformer written out from its own modules,
    the order of operations of PyTorch's pre-norm layers:

        x = fc(hidden + embeds)                                       encoder, per layer (norm_first):
        memory = encoder.norm(layers(x))                                x += self_attn(norm1(x))
        y = queries [1,Q,d] repeated over B                             x += linear2(relu(linear1(norm2(x))))
        y = decoder.norm(layers(y, memory))                           decoder, per layer: the same, with
        conditioning = model(y)                                         y += cross_attn(norm2(y), memory) between
    Traced as is, nn.MultiheadAttention cuts the cross-attention's packed in_proj_weight at offsets read from the
    input's shape (a Slice the graph runs on every call, whose weight no weight-only quantizer sees), and in eval
    mode its fused fast path (aten::_transformer_encoder_layer_fwd) has no ONNX export at all. Here every
    projection is a constant slice of the packed weight, folded into its own initializer at export. The check runs
    the graph against the module itself (`TorchReference`), not against this rewrite."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.fc, self.tfm, self.model, self.query_embs = (projector.fc, projector.tfm, projector.model,
                                                          projector.query_embs)
        self.heads = projector.sizes.nhead

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        x = self.fc(hidden + embeds)
        for layer in self.tfm.encoder.layers:
            x = x + self._attention(layer.self_attn, layer.norm1(x), None)
            x = x + self._feed_forward(layer, layer.norm2(x))
        memory = self.tfm.encoder.norm(x)
        y = self.query_embs.repeat(x.shape[0], 1, 1)
        for layer in self.tfm.decoder.layers:
            y = y + self._attention(layer.self_attn, layer.norm1(y), None)
            y = y + self._attention(layer.multihead_attn, layer.norm2(y), memory)
            y = y + self._feed_forward(layer, layer.norm3(y))
        return self.model(self.tfm.decoder.norm(y))

    @staticmethod
    def _feed_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer.linear2(torch.relu(layer.linear1(x)))

    def _attention(self, attn: nn.MultiheadAttention, x: torch.Tensor, memory: torch.Tensor | None) -> torch.Tensor:
        """nn.MultiheadAttention (batch_first, no mask): x [B,T,d] attends to memory [B,S,d] (itself when None)."""
        d = attn.embed_dim
        dh = d // self.heads
        w, b = attn.in_proj_weight, attn.in_proj_bias
        kv = x if memory is None else memory
        q = F.linear(x, w[:d], b[:d]).unflatten(-1, (self.heads, dh)).transpose(1, 2)             # [B,h,T,dh]
        k = F.linear(kv, w[d:2 * d], b[d:2 * d]).unflatten(-1, (self.heads, dh)).transpose(1, 2)  # [B,h,S,dh]
        v = F.linear(kv, w[2 * d:], b[2 * d:]).unflatten(-1, (self.heads, dh)).transpose(1, 2)    # [B,h,S,dh]
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(dh))
        return attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).flatten(2))


class TorchReference(nn.Module):
    """The projector module itself, run with PyTorch's fused attention fast path off: the oracle the graph is
    checked against (the fast path bypasses the float32 hooks an fp16 copy keeps around its norms)."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.projector(hidden, embeds)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)


def export_projector(module: nn.Module, sizes: ProjectorSizes, out_dir: str | Path, *, precision: str = "fp32",
                     log=_log) -> dict:
    """Write `out_dir`/graphs/projector.onnx from `module` (an OutputProjector at `sizes`, float32, left unchanged)
    and return its manifest record: file, precision, opset, I/O spec, tensorrt_lint, and the checks: parity (the
    graph against torch in ONNX Runtime at batch 1 and 2; fails the export when off) and, below fp32, accuracy
    (cosine and max abs error of `conditioning` against the fp32 graph on fresh random inputs)."""
    from nxc.export.exporter import ExportOptions, export_graph

    if precision not in PRECISIONS:
        raise ExportError(f"projector: precision {precision!r} is not available; choose one of {PRECISIONS}")
    out_dir = Path(out_dir)
    (out_dir / "graphs").mkdir(parents=True, exist_ok=True)
    path = out_dir / "graphs" / f"{names.GRAPH_PROJECTOR}.onnx"
    spec = projector_spec(sizes)
    fp32 = ExportOptions(precision="fp32")
    wrapper = ProjectorGraph(module).eval()
    with tempfile.TemporaryDirectory(prefix=".projector-fp32-", dir=out_dir) as scratch:
        if precision == "fp32":
            log("[nxc-export] projector: exporting (fp32)")
            external = export_graph(wrapper, spec, sizes, path, fp32)
            record = _record(path, spec, "fp32", external, fp32.opset)
            record["parity"] = _parity(TorchReference(module).eval(), path, spec, "fp32")
            return record
        ref = Path(scratch) / path.name
        log("[nxc-export] projector: exporting the fp32 graph (the accuracy reference)")
        if export_graph(wrapper, spec, sizes, ref, fp32):
            raise ExportError("projector: its fp32 weights went to external data; the projector graph is expected "
                              "to stay inline (under 1 GB)")
        if precision == "fp16":
            record = _export_fp16(module, sizes, spec, path, log)
        else:
            parity = _parity(TorchReference(module).eval(), ref, spec, "fp32")
            log("[nxc-export] projector: int8 weight-only (DequantizeLinear)")
            record = _quantize_int8(ref, path, spec, fp32.opset)
            record["parity"] = {**parity, "graph": "fp32, before quantization"}
        record["accuracy"] = _accuracy(ref, path, spec)
    worst = record["accuracy"]["conditioning"]
    log(f"[nxc-export] projector: {record['precision']}, cosine vs fp32 {worst['cosine']:.6f}, "
        f"max abs error {worst['max_abs']:.3g}")
    return record


def _export_fp16(module: nn.Module, sizes: ProjectorSizes, spec, path: Path, log) -> dict:
    """The fp16 graph of a float16 copy of `module` (norms in float32), float32 at its inputs and outputs."""
    from nxc.export.exporter import ExportOptions, export_graph
    from nxc.export.fp16 import Float32IO, float32_nodes, to_fp16

    fp16 = ExportOptions(precision="fp16")
    half = to_fp16(copy.deepcopy(module).eval())

    def at_fp32_io(inner: nn.Module) -> nn.Module:
        return Float32IO(inner, half_inputs=(True, True), half_outputs=(False,)).eval()
    log("[nxc-export] projector: exporting (fp16, norms in float32)")
    external = export_graph(at_fp32_io(ProjectorGraph(half)), spec, sizes, path, fp16)
    record = _record(path, spec, "fp16", external, fp16.opset)
    record["fp32_nodes"] = float32_nodes(path)
    record["parity"] = _parity(at_fp32_io(TorchReference(half)), path, spec, "fp16")
    return record


def _quantize_int8(ref: Path, path: Path, spec, opset: int) -> dict:
    from nxc.calib.quantize import quantize_weights_int8
    changed = quantize_weights_int8(ref, path)
    record = _record(path, spec, "int8-weight-only", [], opset)
    record["quantization"] = {"scheme": "int8 weights per output channel behind DequantizeLinear",
                              "weights": changed}
    return record


def _record(path: Path, spec, precision: str, external: list[str], opset: int) -> dict:
    from nxc.export.graph_files import graph_record
    return graph_record(path, spec, precision, opset, external)


def _parity(wrapper: nn.Module, path: Path, spec, precision: str) -> dict:
    """parity.check_graph at its two shapes (batch 1 and batch 2); an export that does not match fails here."""
    from nxc.export.parity import check_graph
    report = check_graph(wrapper, path, spec, precision=precision, sam_size=0)
    if not report["ok"]:
        raise ExportError(f"graph projector ({precision}) does not match torch in ONNX Runtime: "
                          f"{[c['outputs'] for c in report['checks']]}")
    return report


def _accuracy(ref: Path, path: Path, spec) -> dict:
    """compare_graphs (cosine, max abs error per output) of the graph at `path` against the fp32 graph `ref`, over
    fresh random inputs at batch 1 and 2."""
    from nxc.calib.quantize import compare_graphs
    from nxc.export.parity import random_inputs
    rng = np.random.default_rng(ACCURACY_SEED)
    feeds = [random_inputs(spec, {"batch": b}, rng) for b in (1, 2)]
    return compare_graphs(ref, path, feeds)
