"""Export wrapper for the `llm` graph: LLaMA over input embeddings, with a KV cache that a decode step reads
but never copies.

Contract (nxc.specs): inputs_embeds [B,T,H], attention_mask [B,P+T] (1 = attend), position_ids [B,T],
past_key_values.{i}.key/value [B,P,kv,D]  ->  logits [B,V] and hidden [B,H] of the LAST position only (hidden is
after the final RMSNorm, the tensor the location heads read), and present.{i}.key/value [B,T,kv,D]: only the T
new rows (keys after RoPE). The runtime owns a preallocated [1, capacity, kv, D] buffer per tensor, feeds the
contiguous view [:, :P] (no copy) and writes the new rows into [:, P:P+T] (O(T) per step).

Why this cache ("inplace") and not the usual present = concat(past, new) ("concat"): with concat every decode step
copies the whole cache inside the graph, so a step costs O(P) extra memory traffic and a reply O(n^2). ONNX
Runtime's GroupQueryAttention can share past/present buffers too, but it is a com.microsoft op that TensorRT's ONNX
parser does not take, and nxc ships one graph for both backends. Measured by `benchmarks/kv_cache.py` (embedded
model, ORT 1.31 CPU, 2 cores, IO binding, median of 200 decode steps): inplace 0.61 / 0.61 / 0.70 ms at past
16 / 256 / 1024 (1.15x from 16 to 1024); concat 0.52 / 0.61 / 0.85 ms (1.63x). Concat is cheaper only at tiny
pasts (the runtime's in-place row write is a few numpy assignments); its cost grows with the cache. Both variants
stay exportable so the claim stays checkable: `LlmGraph(kv_mode="concat")`, `nxc-export --kv-mode concat`.
Two layout details were measured too: scores are laid out [B, heads*T, P] so softmax and the scale run along the
long last axis (with P on axis 1, ORT's broadcast Mul and Softmax walked length-1 rows: 1.9x from 16 to 1024),
and the runtime binds its buffers as OrtValues (InferenceSession.run copies numpy inputs: +0.18 ms at 1024).

Attention without copying the cache. Per layer, with G = heads per KV head:

    Qbd [B,nH*T,kv*D] (block-diagonal: head h's q in KV block h//G) ──MatMul(transB)── past K [B,P,kv*D]
        ─▶ scores_past [B,nH*T,P] ─┐
    q · new K ─▶ scores_new ───────┴─ concat(last) ─▶ [B,nH,T,P+T] + mask ─▶ softmax(last, float32) ─┐
    probs_past [B,nH*T,P] ──MatMul── past V [B,P,kv*D] ─▶ [B,nH,T,kv,D] ─ keep block h//G ─▶ ⊕ ─▶ out
    probs_new ────────────────────── new V ─────────────────────────────────────────────────┘

The past K/V enter only MatMuls in their stored layout (a free reshape; the transpose of K is fused into the
GEMM), so a decode step reads the cache once and writes nothing of it. The block-diagonal trick spends kv x the attention FLOPs of
the past part (for TinyLlama sizes, a few % of a step); the masks are exact 0/1, so the sums are the same numbers.
"""
from __future__ import annotations

import torch
from torch import nn

from nxc.model.nextchat import NextChat

KV_MODES = ("inplace", "concat")


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
        self.n_heads, self.n_kv, self.head_dim = sizes.num_heads, sizes.num_kv_heads, sizes.head_dim
        self.eps = sizes.rms_norm_eps
        d = self.head_dim
        inv_freq = 1.0 / (sizes.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        group = self.n_heads // self.n_kv
        block = (torch.arange(self.n_heads)[None, :] // group == torch.arange(self.n_kv)[:, None]).float()
        self.register_buffer("block", block, persistent=False)                  # [kv, nH]: 1 where h uses kv block
        self.register_buffer("kv_of_head", torch.arange(self.n_heads) // group, persistent=False)

    @staticmethod
    def _rms(x: torch.Tensor, norm: nn.Module, eps: float) -> torch.Tensor:
        """RMSNorm accumulated in float32 whatever the weights' precision (as HF's LlamaRMSNorm)."""
        xf = x.float()
        var = xf.pow(2).mean(-1, keepdim=True)
        return (norm.weight.float() * (xf * torch.rsqrt(var + eps))).to(x.dtype)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rot * sin

    def _attention(self, q, k, v, past_k, past_v, add_mask):
        """q [B,T,nH,D], k/v [B,T',kv,D] (new), past_k/v [B,P,kv,D], add_mask [B,1,T,P+T'] -> [B,T,nH*D]."""
        b, t, nh, d = q.shape
        kv = self.n_kv
        p, tn = past_k.shape[1], k.shape[1]
        # reshapes of past tensors use -1 for P: an ONNX Reshape reads a literal 0 as "keep", which breaks P = 0
        q = q.permute(0, 2, 1, 3)                                                        # [B,nH,T,D]
        block = self.block.t().to(q.dtype)[None, :, None, :, None]                       # [1,nH,1,kv,1]
        qbd = (q.unsqueeze(3) * block).reshape(b, nh * t, kv * d)                        # block-diagonal queries
        s_past = torch.matmul(qbd, past_k.reshape(b, -1, kv * d).transpose(1, 2))        # [B,nH*T,P]
        k_rep = k.index_select(2, self.kv_of_head).permute(0, 2, 3, 1)                  # [B,nH,D,T']
        v_rep = v.index_select(2, self.kv_of_head).permute(0, 2, 1, 3)                  # [B,nH,T',D]
        s_new = torch.matmul(q, k_rep).reshape(b, nh * t, -1)                           # [B,nH*T,T']
        scores = torch.cat([s_past, s_new], dim=2).reshape(b, nh, t, p + tn).float() * (d ** -0.5) + add_mask
        probs = torch.softmax(scores, dim=-1).to(q.dtype)                               # softmax in float32
        o_all = torch.matmul(probs[..., :p].reshape(b, nh * t, -1), past_v.reshape(b, -1, kv * d))
        o_past = (o_all.reshape(b, nh, t, kv, d) * block).sum(3)                        # keep head h's KV block
        o_new = torch.matmul(probs[..., p:], v_rep)                                     # [B,nH,T,D]
        return (o_past + o_new).permute(0, 2, 1, 3).reshape(b, t, nh * d)

    def forward(self, inputs_embeds, attention_mask, position_ids, *past):
        """Shapes in the module docstring; past K/V come in the weights' dtype, everything else float32."""
        dtype = self.lm_head.weight.dtype
        b, t, _ = inputs_embeds.shape
        freqs = position_ids[..., None].float() * self.inv_freq                         # [B,T,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]                          # [B,T,1,D]
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        # additive float32 mask [B,1,T,P+T]: padding from attention_mask, causal among the T new positions
        neg = torch.finfo(torch.float32).min
        keep = attention_mask[:, None, None, :].float()                                 # [B,1,1,P+T]
        p = attention_mask.shape[1] - t
        ar = torch.arange(t, device=inputs_embeds.device)
        causal = (ar[None, :] <= ar[:, None]).float()                                   # [T,T']: key t' <= query t
        causal = torch.cat([torch.ones(t, p), causal], dim=1)[None, None]
        add_mask = (1 - keep * causal) * neg
        h = inputs_embeds.to(dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            att = layer.self_attn
            x = self._rms(h, layer.input_layernorm, self.eps)
            q = att.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
            k = att.k_proj(x).reshape(b, t, self.n_kv, self.head_dim)
            v = att.v_proj(x).reshape(b, t, self.n_kv, self.head_dim)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            past_k, past_v = past[2 * i], past[2 * i + 1]
            if self.kv_mode == "concat":     # the measured alternative: the cache is copied every step
                past_k, past_v = torch.cat([past_k, k], 1), torch.cat([past_v, v], 1)
                presents += [past_k, past_v]
                o = self._attention(q, k[:, :0], v[:, :0], past_k, past_v, add_mask)
            else:
                presents += [k, v]
                o = self._attention(q, k, v, past_k, past_v, add_mask)
            h = h + att.o_proj(o)
            x = self._rms(h, layer.post_attention_layernorm, self.eps)
            h = h + layer.mlp.down_proj(nn.functional.silu(layer.mlp.gate_proj(x)) * layer.mlp.up_proj(x))
        last = self._rms(h[:, -1], self.norm, self.eps)
        return (self.lm_head(last).float(), last.float(), *presents)
