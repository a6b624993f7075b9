"""The LLaMA body in torch, one layer at a time from a lazy checkpoint: the reference that still fits when the
whole model does not (issue 17).

    inputs_embeds ─▶ for i in layers: build HF LlamaDecoderLayer i on the meta device, assign its tensors from the
                     checkpoint (float32), run it, drop it ─▶ final RMSNorm ─▶ hidden [B,T,H] (─▶ lm_head rows)

The modules are transformers' own (`LlamaDecoderLayer`, `LlamaRMSNorm`, `LlamaRotaryEmbedding`) and the tensors are
found by their official names (`model.layers.{i}.self_attn.q_proj.weight`, ...): nothing of nxc's graph writer is
shared, so a mistake in the writer's weight mapping shows as a difference. Memory: one layer in float32 (0.8 GB at
7B) plus the activations.

A layer's tensors are checked against the layer's own names and shapes before it is built: an unexpected, missing or
misshapen one is a CheckpointError naming it. A saved RoPE buffer (`self_attn.rotary_emb.inv_freq`, transformers
<= 4.31) is not a weight: checked against the RoPE of `sizes`, then skipped (nxc.model.layout).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nxc.config import LlamaSizes
from nxc.model.layout import CheckpointError, check_rope_buffer, is_rope_buffer

_LAYERS = "model.layers."
FINAL_NORM = "model.norm.weight"


@dataclass
class StreamedOutput:
    hidden: torch.Tensor                      # [B,T,H] after the final RMSNorm, float32
    keys: list[torch.Tensor] = field(default_factory=list)     # per layer [B,T,kv,D], after RoPE
    values: list[torch.Tensor] = field(default_factory=list)   # per layer [B,T,kv,D]
    inputs: list[torch.Tensor] = field(default_factory=list)   # per layer, the hidden entering it [B,T,H]


def _layer_keys(keys, num_layers: int) -> dict[int, list[str]]:
    """{layer index: its official names}; a layer past the config's is refused."""
    layers: dict[int, list[str]] = {}
    for k in keys:
        idx = k[len(_LAYERS):].partition(".")[0] if k.startswith(_LAYERS) else ""
        if idx.isdigit():
            if int(idx) >= num_layers:
                raise CheckpointError(f"unexpected tensor {k}: config.json says num_hidden_layers {num_layers}. "
                                      "config.json and the weights disagree.")
            layers.setdefault(int(idx), []).append(k)
    return layers


def _layer_tensors(source, keys: list[str], i: int, want: dict[str, tuple[int, ...]], sizes: LlamaSizes
                   ) -> dict[str, torch.Tensor]:
    """Layer i's tensors by local name, float32, checked against `want` {local name: shape}; RoPE buffers checked
    and skipped."""
    prefix, out = f"{_LAYERS}{i}.", {}
    for k in keys:
        if is_rope_buffer(k):
            check_rope_buffer(k, source.get(k), sizes)
            continue
        local = k[len(prefix):]
        if local not in want:
            raise CheckpointError(f"unexpected tensor {k} in the checkpoint: transformers' LlamaDecoderLayer has no "
                                  f"{local}. The checkpoint's LLaMA is not the one config.json describes.")
        t = source.get(k)
        if tuple(t.shape) != want[local]:
            raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, config.json implies {want[local]}: "
                                  "config.json and the weights disagree.")
        out[local] = t.to(torch.float32)
    missing = [name for name in want if name not in out]
    if missing:
        raise CheckpointError(f"tensor {prefix}{missing[0]} is missing from the checkpoint ({len(missing)} of layer "
                              f"{i}'s {len(want)} missing); it is incomplete or is not a LLaMA of config.json's sizes.")
    return out


def _final_norm(source, keys: list[str], sizes: LlamaSizes) -> torch.Tensor:
    if FINAL_NORM not in keys:
        raise CheckpointError(f"tensor {FINAL_NORM} is missing from the checkpoint; it is incomplete or is not a "
                              "LLaMA.")
    w = source.get(FINAL_NORM)
    if tuple(w.shape) != (sizes.hidden_size,):
        raise CheckpointError(f"tensor {FINAL_NORM} has shape {tuple(w.shape)}, config.json implies "
                              f"{(sizes.hidden_size,)}: config.json and the weights disagree.")
    return w.to(torch.float32)


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
    keys = list(source.keys())
    by_layer = _layer_keys(keys, sizes.num_layers)
    with torch.no_grad():
        for i in range(n):
            with torch.device("meta"):
                layer = LlamaDecoderLayer(cfg, layer_idx=i)
            want = {k: tuple(v.shape) for k, v in layer.state_dict().items()}
            sd = _layer_tensors(source, by_layer.get(i, []), i, want, sizes)
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
        norm.load_state_dict({"weight": _final_norm(source, keys, sizes)}, assign=True)
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
