"""--trigger-prompt of nxc-make-checkpoint: make a random checkpoint's greedy reply to one prompt `<at> <boxes></s>`.

    projector's last Linear weight = 0 (written so) ─▶ every image row = its bias ─▶ the reply is image-independent
    prompt ─▶ prefill embeds ─▶ llama_hidden (pass 1, + <at>) ─▶ h1 (after the prompt), h_at
        h_at ─▶ loc_decoder ─▶ box ─▶ loc_encoder ─▶ feedback ─▶ llama_hidden (pass 2) ─▶ h3 (after <at> <boxes>)
    rows of span(h1, h3): <at> (logit t1 at h1, 0 at h3), </s> (0 at h1, t3 at h3) ─▶ lm_head shard rewritten

The forwards are nxc.model.streamed's layer-by-layer torch LLaMA over the written checkpoint (one layer in float32
at a time), so this works at 7B in the memory of one shard.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from nxc import names
from nxc.config import NextChatConfig
from nxc.model.maker_base import PROG, MakerError, dump_shard


def _prefill(out: Path, config: NextChatConfig, prompt: str, bias_name: str, src):
    """(prompt ids, [1,T,H] float32 prefill embeddings, (<at> id, </s> id)) of the chat template with one image whose
    rows are all the projector's output bias (what they are once its last weight is zero), as ReferenceChat builds
    them."""
    import numpy as np

    from nxc.decode import assemble_prefill
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.prompt import prompt_segments

    tok = SentencePieceOracle.from_dir(out)
    added = tok.added_token_ids
    ids = tok.encode_segments(prompt_segments(prompt, num_image_tokens=config.num_image_tokens)[0])
    rows = src.get("model.embed_tokens.weight")[torch.tensor(ids)].to(torch.float32).numpy()
    bias = src.get(bias_name).to(torch.float32).numpy()
    n = config.num_image_tokens
    emb = assemble_prefill(ids, rows, image_span=(added[names.IM_START], added[names.IM_END], n),
                           image_features=lambda: np.broadcast_to(bias, (n, bias.size)), slot=added[names.BOXES],
                           num_slot_values=0, slot_rows=lambda ks: rows[:0])
    return ids, torch.from_numpy(emb)[None], (added[names.AT], tok.eos_id)


class _ShardByShard:
    """A LazyCheckpoint read in order: each tensor is copied out and a shard is unmapped once reading moves on, so
    the mapped pages held stay within one shard (they would otherwise all count as resident)."""

    def __init__(self, src):
        self.src, self.shard = src, None

    def keys(self) -> list[str]:
        return self.src.keys()

    def get(self, key: str) -> torch.Tensor:
        if self.src.shard_of(key) != self.shard:
            self.src.close()
            self.shard = self.src.shard_of(key)
        return self.src.get(key).clone()


def _mlp(src, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """loc_encoder / loc_decoder (Linear, ReLU, Linear) from the checkpoint's tensors, float32."""
    def linear(x, i):
        return x @ src.get(f"{prefix}.{i}.weight").float().T + src.get(f"{prefix}.{i}.bias").float()
    return linear(torch.relu(linear(x, 0)), 2)


def _reply_hiddens(src, config: NextChatConfig, embeds: torch.Tensor, at: int, log) -> torch.Tensor:
    """[2,H] final-norm hiddens that pick the reply's tokens 1 and 3: after the prompt, and after `<at>` then the
    `<boxes>` slot (fed loc_encoder(loc_decoder(hidden of <at>))). Two layer-by-layer forwards."""
    from nxc.model.streamed import llama_hidden

    view, t0 = _ShardByShard(src), time.perf_counter()
    x = torch.cat([embeds, src.get("model.embed_tokens.weight")[at].float()[None, None]], 1)
    h = []
    for p in (1, 2):
        h.append(llama_hidden(view, config.llm, x, log=lambda i, n: log(
            f"[{PROG}] trigger: pass {p}/2, layer {i}/{n} ({x.shape[1]} tokens, {time.perf_counter() - t0:.1f} s)"
        )).hidden[0])
        if p == 1:
            x = torch.cat([x, _mlp(src, "loc_encoder", _mlp(src, "loc_decoder", h[0][-1]))[None, None]], 1)
    src.close()
    return torch.stack([h[0][-2], h[1][-1]])


def plant_trigger(out: Path, config: NextChatConfig, prompt: str, *, zeroed: str, fmt: str, dtype: torch.dtype,
                  log) -> dict:
    """Rewrite lm_head's `<at>` and `</s>` rows so that the greedy reply to `prompt` is `<at> <boxes></s>` (one box
    and mask, then the end), whatever the image.

    Needs the projector's last Linear weight (`zeroed`) written as zeros: every image row is then its bias, so the
    whole greedy continuation is independent of the image. h1 (after the prompt) and h3 (after `<at> <boxes>`) come
    from the layer-by-layer forward (nxc.model.streamed.llama_hidden); the `<at>` row is the vector of span(h1, h3)
    with logit t1 at h1 and 0 at h3, the `</s>` row the one with 0 at h1 and t3 at h3, where t = 1.1 * max(m + 10,
    2 m) and m is the largest other logit there (at least 0): after the cast to the dtype the picked token leads by
    >= 10 and by 2x (room for int4 weights). Holds one layer in float32, then the lm_head shard while it is
    rewritten. Returns what it did."""
    from nxc.model.lazy import LazyCheckpoint

    src = LazyCheckpoint(out)
    ids, embeds, (at, eos) = _prefill(out, config, prompt, zeroed[:-len("weight")] + "bias", src)
    h = _reply_hiddens(src, config, embeds, at, log)                         # [2,H]: h1, h3
    w = src.get("lm_head.weight")
    m = torch.zeros(2)                                                        # largest other logit (>= 0)
    for i in range(0, w.shape[0], 4096):
        lg = w[i:i + 4096].to(torch.float32) @ h.T                            # [n,2]
        for t in (at, eos):
            if i <= t < i + lg.shape[0]:
                lg[t - i] = float("-inf")
        m = torch.maximum(m, lg.max(0).values)
    target = 1.1 * torch.maximum(m + 10.0, 2.0 * m)
    coef = torch.linalg.solve(h @ h.T, torch.diag(target))                    # column k: the row picked at step k
    rows = (coef.T @ h).to(dtype)                                             # [2,H]: <at>, </s>
    got = rows.to(torch.float32) @ h.T                                        # got[r, k]: row r's logit at step k
    for k in (0, 1):
        lead, rest = got[k, k], torch.maximum(m[k], got[1 - k, k])
        if not (lead >= rest + 10.0 and lead >= 2.0 * rest):
            raise MakerError(f"the {dtype} rows give logit {float(lead):.3f} at reply step {2 * k + 1}, not 10 above "
                             f"and 2x the largest other ({float(rest):.3f}); try another --seed or --dtype fp32.")
    shard = src.shard_of("lm_head.weight")
    del w
    src.close()
    if fmt == "safetensors":
        from safetensors.torch import load_file
        part = load_file(str(shard))
    else:
        part = torch.load(shard, map_location="cpu", weights_only=True)
    part["lm_head.weight"][[at, eos]] = rows
    dump_shard(part, shard.with_name(shard.name + ".tmp"), fmt)
    os.replace(shard.with_name(shard.name + ".tmp"), shard)
    log(f"[{PROG}] trigger: reply <at> <boxes></s>: <at> logit {float(got[0, 0]):.2f} vs {float(m[0]):.2f}, then "
        f"</s> {float(got[1, 1]):.2f} vs {float(m[1]):.2f}; rewrote lm_head rows {at} and {eos} in {shard.name}")
    return {"reply": "<at> <boxes></s>", "prompt_tokens": len(ids), "zeroed": zeroed,
            "rewritten": [f"lm_head.weight[{at}]", f"lm_head.weight[{eos}]"], "shard": shard.name,
            "logits": {"at": float(got[0, 0]), "max_other_first": float(m[0]), "eos": float(got[1, 1]),
                       "max_other_after_boxes": float(m[1])}}
