"""The `llm` graph's computation as a torch module: LLaMA over input embeddings, with a KV cache that a decode step
reads but never copies. `nxc-export` does not trace it: nxc.export.llm_writer writes the same nodes from the
checkpoint one tensor at a time (any size); this module is the oracle its tests trace (equal outputs at every
precision) and the concat variant benchmarks/kv_cache.py measures.

Contract (nxc.specs): inputs_embeds [B,T,H], attention_mask [B,P+T] (1 = attend), position_ids [B,T],
past_key_values.{i}.key/value [B,P,kv,D]  ->  logits [B,V] and hidden [B,H] of the LAST position only (hidden is
after the final RMSNorm, the tensor the location heads read), and present.{i}.key/value [B,T,kv,D]: only the T
new rows (keys after RoPE). The runtime owns a preallocated [1, capacity, kv, D] buffer per tensor, feeds the
contiguous view [:, :P] (no copy) and writes the new rows into [:, P:P+T] (O(T) per step).

Why this cache ("inplace") and not the usual present = concat(past, new) ("concat"): with concat every decode step
copies the whole cache inside the graph, so a step costs O(P) extra memory traffic and a reply O(n^2). ONNX
Runtime's GroupQueryAttention can share past/present buffers too, but it is a com.microsoft op that TensorRT's ONNX
parser does not take, and nxc ships one graph for both backends. Measured by `benchmarks/kv_cache.py` on the
current (170-node) graph (embedded model, ORT 1.32 CPU, 2 cores, median of 200 decode steps): inplace
0.18 / 0.20 / 0.25 ms at past 16 / 256 / 1024 (1.38x from 16 to 1024); concat 0.14 / 0.18 / 0.28 ms (1.97x).
Concat is cheaper only at short pasts (the in-place step binds 16 cache tensors by address); its cost grows with
the cache. The concat variant stays exportable so the claim stays checkable: `LlmGraph(kv_mode="concat")`,
which benchmarks/kv_cache.py exports by itself; a build always has the inplace cache, the only one the runtime reads.
Two layout details were measured too: scores have P+T on their last axis so softmax runs along the long axis
(with P on axis 1, ORT's broadcast Mul and Softmax walked length-1 rows: 1.9x from 16 to 1024), and the runtime
binds its buffers by address (InferenceSession.run copies numpy inputs: +0.18 ms at 1024).

Attention over the cache where it lies. Per layer, with G = heads per KV head and query rows (head group g, t):

    x ─RMSNorm─ MatMul [Wq;Wk;Wv] ─ RoPE (q also times D^-1/2; v: cos 1, sin 0) ─ Split ─┬─ k, v [B,T,kv,D] ─▶ present.{i}
                                                                                        └─ q
    Qt [B,kv,D,G*T] (q's heads grouped by their KV head, head kv*G+g in column block g of group kv)
    past K [B,P,kv,D] ─rows to [B,kv,P,D]─ MatMul Qt ─▶ [B,kv,P,G*T] ─┐
    new K  [B,T,kv,D] ─rows to [B,kv,T,D]─ MatMul Qt ─▶ [B,kv,T,G*T] ─┴─ concat, transpose ─▶ + mask ─▶ softmax (fp32)
    probs[..., :P] ──MatMul── past V rows to [B,kv,P,D] ─┐
    probs[..., P:] ──MatMul── new V  rows to [B,kv,T,D] ─┴─ ⊕ ─▶ [B,kv,G*T,D] ─▶ [B,T,nH*D] ─▶ o_proj

The cache keeps its layout [B,P,kv,D] (no step writes it but its new rows). ONNX Runtime 1.32 runs each transpose
as a copy (it does not fold a 4-D one into its MatMul), so the form is chosen by what the copies cost: moving whole
D-rows ([B,P,kv,D] -> [B,kv,P,D]) is cheap, a full transpose of K to [B,kv,D,P] is not (4x slower: 44 vs 12 ms for
32 layers' keys at 7B, past 628), hence the scores are computed transposed (K rows times Qt) and only the small
[B,kv,P+T,G*T] result is turned. Measured at 7B sizes (ORT 1.32 CPU, 2 cores, 32 layers of 32 KV heads x 128, past
628, one decode step's attention): 65 ms this form, 91 ms with K fully transposed, 123 ms the block-diagonal form
this replaced (every query head against all KV heads' keys, masked by zeros: kv x the attention FLOPs, little at
TinyLlama's 4 KV heads, 32x at 7B's 32); the cache's bytes at the copy bandwidth would be 19 ms. At TinyLlama's
sizes the three are within 10% (1.1B int4 decode: 30.4 tok/s block-diagonal, 30.2 K fully transposed, 32.2 this).

Few nodes: at the embedded model's size a decode step is mostly per-operator overhead in ONNX Runtime, not
arithmetic. So every reshape target is a constant (ONNX Reshape's 0 = keep that axis, `_reshape`) or, where a
length may be 0, built from B, T, P traced once and shared by all layers; RoPE tables and the additive mask are
built once per call; q|k|v is one MatMul and RoPE one pass over it. Measured by `benchmarks/decode_step.py`
(embedded model, ORT 1.32 CPU, 2 cores, allow_spinning 0, 1 intra-op thread): 170 nodes after ORT's
optimizations where the previous wrapper had 427 (of them 59 Unsqueeze, 44 Gather, 41 Concat, 22 Shape); a decode
step through OrtRunner.run_cached 0.34 -> 0.23 ms at past 64 (1.46x) and 0.38 -> 0.27 ms at past 512 (1.40x);
ORT's run_with_iobinding alone, timed apart, 0.26 -> 0.16 ms at past 64 (1.6x). 2 intra-op threads are slower at
this size (0.28 ms at past 64), as the sessions run without spinning.
"""
from __future__ import annotations

import torch
from torch import nn

from nxc.model.nextchat import NextChat

KV_MODES = ("inplace", "concat")


class _Reshape(torch.autograd.Function):
    """x.reshape(shape) read the ONNX way (0: x's length on that axis, -1: the rest), exported as one Reshape node
    with a constant shape; torch's reshape would turn every traced length into Shape-Gather-Unsqueeze-Concat nodes.
    Only for tensors that cannot be empty (a -1 of nothing is ambiguous)."""

    @staticmethod
    def forward(ctx, x, shape):
        return x.reshape([x.shape[i] if s == 0 else s for i, s in enumerate(shape)])

    @staticmethod
    def symbolic(g, x, shape):
        return g.op("Reshape", x, g.op("Constant", value_t=torch.tensor(shape, dtype=torch.int64)))


def _reshape(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """See _Reshape. `shape` needs a -1 wherever it has a 0 (torch's ONNX shape inference asserts otherwise)."""
    return _Reshape.apply(x, shape)


class LlmGraph(nn.Module):
    """LLaMA forward for export, written from the HF module's weights (HF's own forward keeps its cache in
    Python objects, which an ONNX graph cannot)."""

    def __init__(self, model: NextChat, *, kv_mode: str = "inplace"):
        super().__init__()
        if kv_mode not in KV_MODES:
            raise ValueError(f"kv_mode must be one of {KV_MODES}, got {kv_mode!r}")
        cfg = model.llm.config
        rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise NotImplementedError(f"RoPE type {rope['rope_type']!r} is not supported by the llm export "
                                      "(NExT-Chat's LLaMA uses plain RoPE)")
        sizes = model.config.llm
        self.kv_mode = kv_mode
        self.layers = model.llm.model.layers
        self.norm = model.llm.model.norm
        self.lm_head = model.llm.lm_head
        nh, kv, d = self.n_heads, self.n_kv, self.head_dim = sizes.num_heads, sizes.num_kv_heads, sizes.head_dim
        self.eps = sizes.rms_norm_eps
        group, half = nh // kv, d // 2
        heads = nh + 2 * kv
        # RoPE of all q|k|v heads in one pass over [.., (nH+2kv)*D]: HF's rotate_half(x) is x[..., rot] * sign. v's
        # frequencies are 0 (cos 1, sin 0: v passes exactly) and q's tables are times the attention scale D^-1/2
        inv_freq = 1.0 / (sizes.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        inv_freq = torch.cat([inv_freq, inv_freq]).repeat(heads)
        inv_freq[(nh + kv) * d:] = 0
        scale = torch.tensor([d ** -0.5] * nh + [1.0] * (2 * kv)).repeat_interleave(d)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos_scale", scale, persistent=False)
        self.register_buffer("sin_scale", scale * torch.cat([-torch.ones(half), torch.ones(half)]).repeat(heads),
                             persistent=False)
        rot = torch.arange(heads)[:, None] * d + torch.cat([torch.arange(half, d), torch.arange(half)])
        self.register_buffer("rot", rot.reshape(-1), persistent=False)
        self.group = group

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module, eps: float) -> torch.Tensor:
        """RMSNorm accumulated in float32 whatever the weights' precision (as HF's LlamaRMSNorm)."""
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        y = norm.weight.float() * (xf * torch.rsqrt(var + eps))
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    @staticmethod
    def _qkv(att: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """[B,T,H] -> [B,T,(nH+2kv)*D]: q|k|v in one MatMul (the concatenated weights are a constant in the graph)."""
        projs = (att.q_proj, att.k_proj, att.v_proj)
        bias = None if att.q_proj.bias is None else torch.cat([p.bias for p in projs])
        return nn.functional.linear(x, torch.cat([p.weight for p in projs]), bias)

    def _mask(self, attention_mask: torch.Tensor, t: int, p: int) -> torch.Tensor:
        """Additive float32 mask [B, 1, G*T, P+T], row g*T+t (query t of every head of a KV group): 0 where the
        position is not padding and not after query t (position <= P + t), float32 min elsewhere."""
        dev = attention_mask.device
        query_pos = torch.arange(self.group * t, device=dev) % t + p                            # [G*T]
        causal = torch.arange(attention_mask.shape[1], device=dev) <= query_pos[:, None]         # [G*T,P+T]
        return torch.where(causal & attention_mask.bool()[:, None, None, :], 0.0, torch.finfo(torch.float32).min)

    @staticmethod
    def _attention(qt, k, v, past_k, past_v, add_mask, p: int):
        """qt [B,kv,D,G*T] (queries grouped per KV head, transposed, already scaled), new k/v [B,T,kv,D] or None
        (the past holds all keys), past_k/v [B,P,kv,D] in the cache's layout, add_mask [B,1,G*T,P(+T)]
        -> [B,kv,G*T,D]. Keys are moved by whole rows ([B,kv,P,D]) and the scores computed transposed: a full
        transpose of K to [B,kv,D,P] is 4x slower in ONNX Runtime (module docstring)."""
        scores = torch.matmul(past_k.transpose(1, 2), qt)                                       # [B,kv,P,G*T]
        if k is not None:
            scores = torch.cat([scores, torch.matmul(k.transpose(1, 2), qt)], dim=2)
        probs = torch.softmax(scores.transpose(2, 3).float() + add_mask, dim=-1).to(qt.dtype)   # float32 softmax
        if k is None:
            return torch.matmul(probs, past_v.transpose(1, 2))
        return torch.matmul(probs[..., :p], past_v.transpose(1, 2)) + torch.matmul(probs[..., p:], v.transpose(1, 2))

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        """Shapes in the module docstring; past K/V come in the weights' dtype, everything else float32."""
        dtype = self.lm_head.weight.dtype
        nh, kv, d = self.n_heads, self.n_kv, self.head_dim
        t = inputs_embeds.shape[1]                                  # traced once; every dynamic shape reuses it
        p = attention_mask.shape[1] - t
        angle = position_ids[..., None].float() * self.inv_freq                                 # [B,T,(nH+2kv)*D]
        cos = (angle.cos() * self.cos_scale).to(dtype)
        sin = (angle.sin() * self.sin_scale).to(dtype)
        add_mask = self._mask(attention_mask, t, p)
        g = self.group
        h = inputs_embeds.to(dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            qkv = self._qkv(att, self._rms(h, layer.input_layernorm, self.eps))
            qkv = qkv * cos + qkv[..., self.rot] * sin                                          # RoPE
            q, k, v = torch.split(qkv, [nh * d, kv * d, kv * d], dim=-1)                        # [B,T,heads*D]
            qt = _reshape(_reshape(q, 0, 0, kv, -1, d).permute(0, 2, 4, 3, 1), 0, kv, d, -1)     # [B,kv,D,G*T]
            k, v = _reshape(k, 0, 0, -1, d), _reshape(v, 0, 0, -1, d)                           # [B,T,kv,D]
            past_k, past_v = past[2 * i], past[2 * i + 1]                                       # [B,P,kv,D]
            if self.kv_mode == "concat":     # the measured alternative: the cache is copied every step
                past_k, past_v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
                presents += [past_k, past_v]
                o = self._attention(qt, None, None, past_k, past_v, add_mask, p + t)
            else:
                presents += [k, v]
                o = self._attention(qt, k, v, past_k, past_v, add_mask, p)
            o = _reshape(_reshape(o, 0, kv, g, -1, d).permute(0, 3, 1, 2, 4), 0, 0, nh * d)      # [B,T,nH*D]
            h = h + att.o_proj(o)
            x = self._rms(h, layer.post_attention_layernorm, self.eps)
            h = h + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
        last = self._rms(h[:, -1], self.norm, self.eps)
        logits = self.lm_head(last)
        if dtype != torch.float32:             # (a float32 graph gets no Cast nodes for nothing)
            logits, last = logits.float(), last.float()
        return (logits, last, *presents)
