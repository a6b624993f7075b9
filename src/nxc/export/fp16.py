"""FP16 export: weights and activations in float16, graph inputs and outputs in float32 (KV cache in float16).

Norms stay float32: every LayerNorm / LayerNorm2d / RMSNorm runs on float32 inputs with float32 weights (hooks cast
around it), the llm wrapper accumulates RMSNorm and softmax in float32 itself. The issue on precisions refines
this (per-node precision records); this is the numerically safe baseline.
"""
from __future__ import annotations

import torch
from torch import nn


def _norm_types() -> tuple[type, ...]:
    from segment_anything.modeling.common import LayerNorm2d
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    return (nn.LayerNorm, nn.GroupNorm, LayerNorm2d, LlamaRMSNorm)     # GroupNorm: diffusers' UNet and VAE


def _to_float(_module, args):
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _to_half(_module, _args, out):
    return out.half() if torch.is_tensor(out) else out


def to_fp16(model: nn.Module) -> nn.Module:
    """Cast `model` to float16 in place, keeping every norm in float32 behind casts. Returns it."""
    from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom
    model.half()
    for m in model.modules():
        if isinstance(m, PositionEmbeddingRandom):   # Fourier features of pixel coordinates: float32 (SamDecoderGraph)
            m.float()
        if isinstance(m, _norm_types()):
            m.float()
            m.register_forward_pre_hook(_to_float)
            m.register_forward_hook(_to_half)
    return model


class Float32IO(nn.Module):
    """Graph boundary for an fp16 wrapper: float32 inputs are cast to float16 (except the names in `keep`,
    e.g. KV cache inputs already float16), float outputs are cast back to float32 (except KV outputs)."""

    def __init__(self, inner: nn.Module, *, half_inputs: tuple[bool, ...], half_outputs: tuple[bool, ...]):
        super().__init__()
        self.inner, self.half_inputs, self.half_outputs = inner, half_inputs, half_outputs

    def forward(self, *args):
        args = [a.half() if h and a.is_floating_point() else a for a, h in zip(args, self.half_inputs)]
        out = self.inner(*args)
        out = out if isinstance(out, tuple) else (out,)
        res = tuple(o if h else o.float() for o, h in zip(out, self.half_outputs))
        return res if len(res) > 1 else res[0]


def _types_only(model) -> None:
    """Drop the values of float initializers of 1 KiB or more, keeping names, types and dims (as a graph with
    external data loaded without it): shape inference reads types and small integer tensors (shapes, axes), never
    weight values, so its result is the same without holding the weights (three times, as infer_shapes copies)."""
    import onnx
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16)
    for t in model.graph.initializer:
        if t.data_type in floats and t.HasField("raw_data") and len(t.raw_data) >= 1024:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            entry = t.external_data.add()
            entry.key, entry.value = "location", "(not loaded)"


def float32_nodes(path) -> dict:
    """Which nodes of an fp16 graph still compute in float32 (norms, softmax, casts at the boundary), for the
    manifest: {"count", "ops": {op type: count}, "nodes": first 40 names}."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    _types_only(model)
    model = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(model.graph.value_info) + list(model.graph.output)}
    hits = [n for n in model.graph.node
            if any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output) and n.op_type not in ("Constant", "Shape")]
    ops: dict[str, int] = {}
    for n in hits:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"count": len(hits), "ops": dict(sorted(ops.items())), "nodes": [n.name for n in hits[:40]]}
