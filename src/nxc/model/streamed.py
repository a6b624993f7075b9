"""The LLaMA body in torch, one layer at a time from a lazy checkpoint: the reference that still fits when the
whole model does not (issue 17).

    inputs_embeds ─▶ for i in layers: build HF LlamaDecoderLayer i on the meta device, assign its tensors from the
                     checkpoint (float32), run it, drop it ─▶ final RMSNorm ─▶ hidden [B,T,H] (─▶ lm_head rows)

The modules are transformers' own (`LlamaDecoderLayer`, `LlamaRMSNorm`, `LlamaRotaryEmbedding`) and the tensors are
found by their official names (`model.layers.{i}.self_attn.q_proj.weight`, ...): nothing of nxc's graph writer is
shared, so a mistake in the writer's weight mapping shows as a difference. Memory: one layer in float32 (0.8 GB at
7B) plus the activations.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nxc.config import LlamaSizes


@dataclass
class StreamedOutput:
    hidden: torch.Tensor                      # [B,T,H] after the final RMSNorm, float32
    keys: list[torch.Tensor] = field(default_factory=list)     # per layer [B,T,kv,D], after RoPE
    values: list[torch.Tensor] = field(default_factory=list)   # per layer [B,T,kv,D]
    inputs: list[torch.Tensor] = field(default_factory=list)   # per layer, the hidden entering it [B,T,H]


def _layer_tensors(source, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: source.get(k).to(torch.float32) for k in source.keys() if k.startswith(prefix)}


def llama_hidden(source, sizes: LlamaSizes, inputs_embeds: torch.Tensor, *, num_layers: int | None = None,
                 keep_cache: bool = False, log=None) -> StreamedOutput:
    """Final-norm hidden states of `inputs_embeds` [B,T,H] (positions 0..T-1, causal, no padding) through the first
    `num_layers` layers (default all) of the LLaMA in `source` (a `nxc.model.lazy.LazyCheckpoint`, official names).
    keep_cache: also return every layer's keys (after RoPE) and values, [B,T,kv,D], and the hidden entering each
    layer (`inputs`, with the final norm's input last)."""
    from transformers import DynamicCache
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

    from nxc.model.nextchat import llama_config

    cfg = llama_config(sizes)
    n = sizes.num_layers if num_layers is None else num_layers
    b, t, _ = inputs_embeds.shape
    h = inputs_embeds.to(torch.float32)
    pos = torch.arange(t)[None].expand(b, t)
    rope = LlamaRotaryEmbedding(cfg)
    cos_sin = rope(h, pos)
    mask = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None].expand(b, 1, t, t)
    cache = DynamicCache() if keep_cache else None
    out = StreamedOutput(hidden=h)
    with torch.no_grad():
        for i in range(n):
            with torch.device("meta"):
                layer = LlamaDecoderLayer(cfg, layer_idx=i)
            sd = _layer_tensors(source, f"model.layers.{i}.")
            layer.load_state_dict(sd, strict=True, assign=True)
            layer.eval()
            if keep_cache:
                out.inputs.append(h)
            r = layer(h, attention_mask=mask, position_ids=pos, cache=cache, use_cache=keep_cache,
                      position_embeddings=cos_sin)
            h = r[0] if isinstance(r, tuple) else r
            del layer, sd
            if log is not None:
                log(i + 1, n)
        with torch.device("meta"):
            norm = LlamaRMSNorm(sizes.hidden_size, eps=sizes.rms_norm_eps)
        norm.load_state_dict({"weight": source.get("model.norm.weight").to(torch.float32)}, assign=True)
        if keep_cache:
            out.inputs.append(h)
        out.hidden = norm(h)
    if keep_cache:
        for i in range(n):
            k, v = _cache_layer(cache, i)
            out.keys.append(k.transpose(1, 2))
            out.values.append(v.transpose(1, 2))
    return out


def _cache_layer(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keys, values) [B,kv,T,D] of layer i, across transformers' cache APIs."""
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def lm_head_logits(source, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] float32 -> logits [..., V] with the checkpoint's lm_head (read once, float32)."""
    w = source.get("lm_head.weight").to(torch.float32)
    return hidden @ w.T
