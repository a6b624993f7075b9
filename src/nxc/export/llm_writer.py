"""The `llm` graph written node by node from the model's sizes, its weights streamed from the checkpoint one tensor at
a time (issue 17): the one llm export path, at every size and precision.

    sizes ─▶ nodes (the graph of nxc.export.llm.LlmGraph: same ops, same I/O contract, same in-place KV cache)
    checkpoint ─ one tensor ─▶ transpose, convert (fp32 | fp16 | int8 / int4 MatMulNBits blocks of 32) ─▶ append to
                 <graph>.onnx.data (4 KiB aligned, so ONNX Runtime can map it) ─▶ dropped

Nothing holds more than one weight (the largest, lm_head, is 0.5 GB in float32 at 7B) and the graph proto holds only
references into the data file, so the export's memory does not grow with the model. A graph whose weights are under
`inline_bytes` is rewritten with its weights inline (the layout small builds always had).

The computation is `LlmGraph.forward` (nxc.export.llm, whose docstring has the why and the measurements): RMSNorm
accumulated in float32, q|k|v as one MatMul, RoPE in one pass with q pre-scaled by D^-1/2, queries grouped per KV
head against the past keys transposed from their stored layout, float32 softmax, the new K/V rows as the present
outputs. The torch module stays as the oracle the tests trace; this writer is what `nxc-export` runs. Tensor names are stable (`h.{i}` enters layer i, `rope.cos`, `rope.sin`, `attn.mask`,
`len.past`, `len.past_vec`), so a check can cut the written graph into pieces (nxc.export.llm_check).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from nxc.config import LlamaSizes

BLOCK_SIZE = 32                     # MatMulNBits blocks along K (ORT's default, what the quantizer used)
ALIGN = 4096
_F32, _F16, _I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT64
_NP = {_F32: np.float32, _F16: np.float16}


def llama_weight_names(i: int) -> dict[str, str]:
    """Official names of layer i's tensors (HF LLaMA names under `model.`)."""
    p = f"model.layers.{i}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight",
            "input_norm": p + "input_layernorm.weight", "post_norm": p + "post_attention_layernorm.weight"}


FINAL_NORM, LM_HEAD = "model.norm.weight", "lm_head.weight"


class WeightError(ValueError):
    """A weight the llm graph needs is missing or has the wrong shape: the message names it."""


@dataclass(frozen=True)
class LlmPrecision:
    name: str                        # fp32 | fp16 | int8 | int4
    block_size: int = BLOCK_SIZE     # int8 / int4: MatMulNBits blocks along K (nxc-export --block-size)

    @property
    def dtype(self) -> int:          # activations and float weights
        return _F16 if self.name == "fp16" else _F32

    @property
    def bits(self) -> int | None:
        return {"int8": 8, "int4": 4}.get(self.name)


class _DataFile:
    """Appends tensors to the external-data file and returns TensorProtos that point into it."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb")
        self.offset = 0

    def add(self, name: str, array: np.ndarray, data_type: int | None = None) -> TensorProto:
        array = np.ascontiguousarray(array)
        pad = -self.offset % ALIGN
        if pad:
            self.f.write(b"\0" * pad)
            self.offset += pad
        self.f.write(array.tobytes())
        t = TensorProto()
        t.name = name
        t.dims.extend(array.shape)
        t.data_type = data_type if data_type is not None else helper.np_dtype_to_tensor_dtype(array.dtype)
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            e = t.external_data.add()
            e.key, e.value = k, v
        self.offset += array.nbytes
        return t

    def close(self) -> None:
        self.f.close()


class _Graph:
    """A small node builder: unique output names, constants inline, weights through _DataFile."""

    def __init__(self, data: _DataFile):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.data = data
        self._n = 0

    def op(self, op_type: str, inputs, out: str | None = None, *, n_out: int = 1, domain: str = "", **attrs):
        self._n += 1
        name = f"{op_type}_{self._n}"
        outs = [out] if out and n_out == 1 else [f"{name}_out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, name: str, array: np.ndarray, data_type: int | None = None) -> str:
        self.inits.append(self.data.add(name, array, data_type))
        return name


class _Weights:
    """Reads the checkpoint's tensors for the writer, checking names and shapes as it goes."""

    def __init__(self, source, sizes: LlamaSizes):
        self.source, self.sizes = source, sizes

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.source:
            raise WeightError(f"weight {key} is missing from the checkpoint; it is incomplete or is not a LLaMA of "
                              f"the sizes in config.json")
        w = self.source.numpy(key, np.float32)
        if tuple(w.shape) != shape:
            raise WeightError(f"weight {key} has shape {tuple(w.shape)}, config.json implies {shape}: config.json "
                              "and the weights disagree")
        return w

    def check_rope(self, i: int) -> None:
        """Layer i's saved RoPE buffer (transformers <= 4.31), if the checkpoint has one: not a weight, refused
        (CheckpointError, named) when it disagrees with the RoPE this graph computes, else skipped."""
        from nxc.model.layout import check_rope_buffer, rope_buffer_name
        key = rope_buffer_name(i)
        if key in self.source:
            import torch
            check_rope_buffer(key, torch.from_numpy(self.source.numpy(key, np.float32)), self.sizes)


def quantize_blocks(w_kn: np.ndarray, bits: int, *, columns: int = 4096,
                    block: int = BLOCK_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """W [K,N] -> MatMulNBits' packed [N, K/32, 32*bits/8] uint8 and scales [N, K/32] float32 (symmetric, blocks of
    32 along K), by ONNX Runtime's own block quantizer, `columns` output columns at a time (each column's blocks
    are independent), so the only float copy is one slice of W."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits
    k, n = w_kn.shape
    kb = (k + block - 1) // block
    packed = np.zeros((n, kb, block * bits // 8), np.uint8)
    scales = np.zeros((n, kb), np.float32)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    for a in range(0, n, columns):
        b = min(a + columns, n)
        w = np.zeros((kb * block, b - a), np.float32)
        w[:k] = w_kn[:, a:b]
        zero_points = np.zeros((b - a, (kb + 8 // bits - 1) // (8 // bits)), np.uint8)
        p, sc = np.zeros((b - a,) + packed.shape[1:], np.uint8), np.zeros((b - a, kb), np.float32)
        quantize(p, w, sc, zero_points, block, b - a, k, True)
        packed[a:b], scales[a:b] = p, sc
    return packed, scales


def _matmul(g: _Graph, x: str, w_kn: np.ndarray, name: str, prec: LlmPrecision) -> str:
    """x [.., K] @ W [K, N]: a MatMul with a float initializer, or MatMulNBits (bits 4 / 8, symmetric, blocks of
    32 along K, accuracy_level 4) with the weight quantized here, one tensor at a time."""
    k, n = w_kn.shape
    if prec.bits is None:
        return g.op("MatMul", [x, g.weight(name, w_kn.astype(_NP[prec.dtype]))])
    packed, scales = quantize_blocks(w_kn, prec.bits, block=prec.block_size)
    q = g.weight(f"{name}_Q{prec.bits}", packed)
    s = g.weight(f"{name}_scales", scales)
    return g.op("MatMulNBits", [x, q, s], domain="com.microsoft", K=k, N=n, bits=prec.bits, block_size=prec.block_size,
                accuracy_level=4)


def _rms(g: _Graph, x: str, w: np.ndarray, eps: float, prec: LlmPrecision, out: str | None = None) -> str:
    """RMSNorm accumulated in float32 (x cast up and the result cast back in an fp16 graph), HF's formula."""
    if prec.dtype == _F16:
        x = g.op("Cast", [x], to=_F32)
        w = w.astype(np.float16).astype(np.float32)           # the fp16 model's norm weights, held in float32
    var = g.op("ReduceMean", [g.op("Pow", [x, "c.two"])], axes=[-1], keepdims=1)
    inv = g.op("Div", ["c.one", g.op("Sqrt", [g.op("Add", [var, "c.eps"])])])
    nw = g.weight(f"{out or x}.norm_weight", w.astype(np.float32)) if w.size * 4 >= 1024 else \
        g.const(f"{out or x}.norm_weight", w.astype(np.float32))
    y = g.op("Mul", [nw, g.op("Mul", [x, inv])], None if prec.dtype == _F16 else out)
    return g.op("Cast", [y], out, to=_F16) if prec.dtype == _F16 else y


def _rope_tables(sizes: LlamaSizes):
    """inv_freq, cos/sin scales and the rotate_half gather over all q|k|v heads (LlmGraph.__init__)."""
    nh, kv, d = sizes.num_heads, sizes.num_kv_heads, sizes.head_dim
    half, heads = d // 2, nh + 2 * kv
    # the same float32 arithmetic as torch's: rope_theta ** (arange / d) then 1 / that
    import torch
    inv = (1.0 / (sizes.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))).numpy()
    inv_freq = np.tile(np.concatenate([inv, inv]), heads).astype(np.float32)
    inv_freq[(nh + kv) * d:] = 0
    scale = np.repeat(np.array([d ** -0.5] * nh + [1.0] * (2 * kv), np.float32), d)
    sign = np.tile(np.concatenate([-np.ones(half, np.float32), np.ones(half, np.float32)]), heads)
    rot = (np.arange(heads)[:, None] * d + np.concatenate([np.arange(half, d), np.arange(half)])).reshape(-1)
    return inv_freq, scale, (scale * sign).astype(np.float32), rot.astype(np.int64)


def write_llm_graph(source, sizes: LlamaSizes, path: str | Path, spec, *, precision: str = "fp32", opset: int = 17,
                    inline_bytes: int = 1 << 30, producer: str = "nxc", doc: str = "", log=None,
                    block_size: int = BLOCK_SIZE) -> list[str]:
    """Write the `llm` graph of a LLaMA with `sizes` to `path`, reading weights from `source` (official names, see
    `llama_weight_names`; `.numpy(key, dtype)` and `in`: a `nxc.model.lazy.LazyCheckpoint` or `ModelWeights`).
    `spec` is the llm GraphSpec (names, dtypes, axes). Returns the external-data file names written beside `path`
    (none when the weights are under `inline_bytes`). `log(done, total, message)` is called per layer."""
    path = Path(path)
    prec = LlmPrecision(precision, block_size)
    nh, kv, d, hsz = sizes.num_heads, sizes.num_kv_heads, sizes.head_dim, sizes.hidden_size
    if nh % kv or hsz != nh * d:
        raise WeightError(f"num_heads {nh}, num_kv_heads {kv} and hidden_size {hsz} do not make a LLaMA attention")
    data_name = path.name + ".data"
    data = _DataFile(path.parent / data_name)
    g = _Graph(data)
    w = _Weights(source, sizes)
    dt = prec.dtype
    kv_dt = _F16 if spec.inputs[3].dtype == "float16" else _F32
    try:
        # -- constants shared by all layers ------------------------------------------------------------------
        g.const("c.two", np.array(2.0, np.float32))
        g.const("c.one", np.array(1.0, np.float32))
        g.const("c.eps", np.array(sizes.rms_norm_eps, np.float32))
        g.const("c.zero_f", np.array(0.0, np.float32))
        g.const("c.fmin", np.array(np.finfo(np.float32).min, np.float32))
        g.const("c.i0", np.array(0, np.int64))
        g.const("c.i1", np.array(1, np.int64))
        g.const("c.ax0", np.array([0], np.int64))
        g.const("c.ax_last", np.array([-1], np.int64))
        g.const("c.last_pos", np.array(-1, np.int64))
        g.const("c.big", np.array([np.iinfo(np.int64).max], np.int64))
        inv_freq, cos_scale, sin_scale, rot = _rope_tables(sizes)
        g.const("rope.inv_freq", inv_freq)
        g.const("rope.cos_scale", cos_scale)
        g.const("rope.sin_scale", sin_scale)
        g.const("rope.rot", rot)
        grp = nh // kv
        g.const("c.group", np.array(grp, np.int64))
        g.const("shape.q5", np.array([0, 0, kv, -1, d], np.int64))
        g.const("shape.qt", np.array([0, kv, d, -1], np.int64))
        g.const("shape.present", np.array([0, 0, -1, d], np.int64))
        g.const("shape.o5", np.array([0, kv, grp, -1, d], np.int64))
        g.const("shape.o", np.array([0, 0, nh * d], np.int64))

        # -- lengths, RoPE tables, the additive mask (once per call) ----------------------------------------
        shape_e = g.op("Shape", ["inputs_embeds"])
        t = g.op("Gather", [shape_e, "c.i1"], "len.sequence", axis=0)
        total = g.op("Gather", [g.op("Shape", ["attention_mask"]), "c.i1"], "len.total", axis=0)
        p = g.op("Sub", [total, t], "len.past")
        angle = g.op("Mul", [g.op("Cast", [g.op("Unsqueeze", ["position_ids", "c.ax_last"])], to=_F32),
                             "rope.inv_freq"])
        cos = g.op("Mul", [g.op("Cos", [angle]), "rope.cos_scale"], None if dt == _F16 else "rope.cos")
        sin = g.op("Mul", [g.op("Sin", [angle]), "rope.sin_scale"], None if dt == _F16 else "rope.sin")
        if dt == _F16:
            cos, sin = g.op("Cast", [cos], "rope.cos", to=_F16), g.op("Cast", [sin], "rope.sin", to=_F16)
        rows = g.op("Range", ["c.i0", g.op("Mul", [t, "c.group"]), "c.i1"])
        query_pos = g.op("Add", [g.op("Mod", [rows, t]), p])                                          # [G*T]
        causal = g.op("LessOrEqual", [g.op("Range", ["c.i0", total, "c.i1"]),
                                      g.op("Unsqueeze", [query_pos, "c.ax_last"])])                   # [G*T,P+T]
        valid = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], to=TensorProto.BOOL), "c.ax12"])
        g.const("c.ax12", np.array([1, 2], np.int64))
        g.op("Where", [g.op("And", [causal, valid]), "c.zero_f", "c.fmin"], "attn.mask")      # [B,1,G*T,P+T]
        g.op("Unsqueeze", [p, "c.ax0"], "len.past_vec")
        h = g.op("Cast", ["inputs_embeds"], "h.0", to=_F16) if dt == _F16 else \
            g.op("Identity", ["inputs_embeds"], "h.0")

        # -- layers ---------------------------------------------------------------------------------------
        t0 = time.perf_counter()
        nl = sizes.num_layers
        for i in range(nl):
            n = llama_weight_names(i)
            w.check_rope(i)
            x = _rms(g, h, w.get(n["input_norm"], (hsz,)), sizes.rms_norm_eps, prec, out=f"l{i}.attn_in")
            wqkv = np.concatenate([w.get(n["q"], (nh * d, hsz)), w.get(n["k"], (kv * d, hsz)),
                                   w.get(n["v"], (kv * d, hsz))]).T
            qkv = _matmul(g, x, wqkv, f"l{i}.qkv", prec)
            del wqkv
            qkv = g.op("Add", [g.op("Mul", [qkv, "rope.cos"]),
                               g.op("Mul", [g.op("Gather", [qkv, "rope.rot"], axis=2), "rope.sin"])])
            q, k, v = g.op("Split", [qkv, g.const(f"l{i}.split", np.array([nh * d, kv * d, kv * d], np.int64))],
                           n_out=3, axis=-1)
            qt = g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [q, "shape.q5"])], perm=[0, 2, 4, 3, 1]),
                                  "shape.qt"])                                                   # [B,kv,D,G*T]
            same = kv_dt == dt                       # then the new rows are the present outputs themselves
            k4 = g.op("Reshape", [k, "shape.present"], f"present.{i}.key" if same else None)     # [B,T,kv,D]
            v4 = g.op("Reshape", [v, "shape.present"], f"present.{i}.value" if same else None)
            past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"            # [B,P,kv,D]
            if not same:
                past_k, past_v = g.op("Cast", [past_k], to=dt), g.op("Cast", [past_v], to=dt)
                g.op("Cast", [k4], f"present.{i}.key", to=kv_dt)
                g.op("Cast", [v4], f"present.{i}.value", to=kv_dt)
            # per-KV-head MatMuls over the cache in its stored layout (nxc.export.llm: why and the figures)
            scores = g.op("Concat", [g.op("MatMul", [g.op("Transpose", [past_k], perm=[0, 2, 1, 3]), qt]),
                                     g.op("MatMul", [g.op("Transpose", [k4], perm=[0, 2, 1, 3]), qt])], axis=2)
            scores = g.op("Transpose", [scores], perm=[0, 1, 3, 2])                              # [B,kv,G*T,P+T]
            if dt == _F16:
                scores = g.op("Cast", [scores], to=_F32)
            probs = g.op("Softmax", [g.op("Add", [scores, "attn.mask"])], axis=-1)
            if dt == _F16:
                probs = g.op("Cast", [probs], to=_F16)
            o = g.op("Add", [g.op("MatMul", [g.op("Slice", [probs, "c.ax0", "len.past_vec", "c.ax_last"]),
                                             g.op("Transpose", [past_v], perm=[0, 2, 1, 3])]),
                             g.op("MatMul", [g.op("Slice", [probs, "len.past_vec", "c.big", "c.ax_last"]),
                                             g.op("Transpose", [v4], perm=[0, 2, 1, 3])])])          # [B,kv,G*T,D]
            o = g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [o, "shape.o5"])], perm=[0, 3, 1, 2, 4]),
                                 "shape.o"])                                                     # [B,T,nH*D]
            h = g.op("Add", [h, _matmul(g, o, w.get(n["o"], (hsz, nh * d)).T, f"l{i}.o_proj", prec)])
            x = _rms(g, h, w.get(n["post_norm"], (hsz,)), sizes.rms_norm_eps, prec, out=f"l{i}.mlp_in")
            gate = _matmul(g, x, w.get(n["gate"], (sizes.intermediate_size, hsz)).T, f"l{i}.gate_proj", prec)
            up = _matmul(g, x, w.get(n["up"], (sizes.intermediate_size, hsz)).T, f"l{i}.up_proj", prec)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
            down = _matmul(g, act, w.get(n["down"], (hsz, sizes.intermediate_size)).T, f"l{i}.down_proj", prec)
            h = g.op("Add", [h, down], f"h.{i + 1}")
            if log is not None:
                done = time.perf_counter() - t0
                log(i + 1, nl, f"{data.offset / 1e6:,.0f} MB written, {done:.0f} s, "
                           f"eta {done / (i + 1) * (nl - i - 1):.0f} s")

        # -- the last position: final norm, lm_head --------------------------------------------------------
        last = g.op("Gather", [h, "c.last_pos"], axis=1)                                               # [B,H]
        hidden = _rms(g, last, w.get(FINAL_NORM, (hsz,)), sizes.rms_norm_eps, prec, out="final_norm")
        logits = _matmul(g, hidden, w.get(LM_HEAD, (sizes.vocab_size, hsz)).T, "lm_head", prec)
        g.op("Cast", [logits], "logits", to=_F32)
        g.op("Cast", [hidden], "hidden", to=_F32)
    finally:
        data.close()

    graph = helper.make_graph(g.nodes, "llm", [_value_info(s) for s in spec.inputs],
                              [_value_info(s) for s in spec.outputs], initializer=g.inits)
    imports = [helper.make_opsetid("", opset)]
    if prec.bits is not None:
        imports.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=imports, producer_name=producer)
    model.ir_version = min(model.ir_version, 10)
    model.doc_string = doc
    external = [data_name]
    if data.offset <= inline_bytes:                   # small: weights inline, as small builds always were
        onnx.load_external_data_for_model(model, str(path.parent))
        for t in model.graph.initializer:
            t.ClearField("external_data")
            t.data_location = TensorProto.DEFAULT
        os.unlink(data.path)
        external = []
    onnx.save_model(model, str(path))
    return external


def _value_info(s) -> onnx.ValueInfoProto:
    elem = {"float32": _F32, "float16": _F16, "int64": _I64}[s.dtype]
    return helper.make_tensor_value_info(s.name, elem, [d if isinstance(d, int) else d for d in s.shape])


class ModelWeights:
    """The writer's weight source over a loaded torch LLaMA (tests, or a model already in memory): official names,
    `.numpy(key, dtype)`."""

    def __init__(self, llm):
        self._sd = {k: v for k, v in llm.state_dict().items()}

    def __contains__(self, key: str) -> bool:
        return key in self._sd

    def keys(self):
        return list(self._sd)

    def get(self, key: str):
        return self._sd[key]

    def numpy(self, key: str, dtype=np.float32) -> np.ndarray:
        import torch
        return self._sd[key].detach().to(torch.float32).numpy().astype(dtype, copy=True)
