"""Reference generation with NExT-Chat's trigger feedback (reference §5), batch 1.

           prompt ids ──▶ embed ──┬─ image rows  ◀── encode_image(pixels)
                                  └─ <boxes> rows ◀── loc_encoder(region boxes)
                                          │
                                          ▼
      ┌──────────────▶ llm_step(embeds, cache) ──▶ logits, hidden h
      │                                                │
      │        fed token was <at>? ──yes──▶ box = loc_decoder(h); emit <boxes>; next = loc_encoder(box)
      │                 │ no
      │                 ▼
      └──── next = embed(pick(logits))           (stop at </s> or max_new_tokens)

After the loop, every trigger's h gives a box, a seg prompt, and (SAM run once) a mask.
Deviation from the original, as the reference allows: the token after `<at>` is forced to `<boxes>`
instead of being sampled, so `</s>` can never cut a detection in half.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers import DynamicCache

from nxc.model.nextchat import NextChat
from nxc.sampling import SamplingParams, pick_token


@dataclass
class TokenIds:
    """Ids the loop needs (reference §2)."""
    im_patch: int
    im_start: int
    im_end: int
    at: int
    boxes: int
    eos: int


@dataclass
class Generation:
    token_ids: list[int]              # generated ids, `<boxes>` at every slot after `<at>`
    finish_reason: str                # "stop" (</s>) or "length"
    trigger_hidden: torch.Tensor      # [K,H] final-norm hidden at each fed `<at>`
    boxes: torch.Tensor               # [K,4] normalised xyxy, padded-square frame
    low_res_logits: torch.Tensor | None   # [K,1,4g,4g]
    mask_logits: torch.Tensor | None      # [K,1,S,S] float32, SAM-padded frame
    iou: torch.Tensor | None              # [K,1]
    feedback_embeds: torch.Tensor     # [K,H] what was fed after each `<at>`
    step_logits: list[np.ndarray] | None = None   # [V] per generated token, when asked for


def prefill_embeds(model: NextChat, ids: list[int], tok: TokenIds, image_features: torch.Tensor | None,
                   region_boxes: torch.Tensor | None) -> torch.Tensor:
    """[1,T,H]: token embeddings, image rows after each `<im_start>`, loc_encoder rows at `<boxes>` (§5.1)."""
    ids_t = torch.tensor([ids], dtype=torch.long)
    emb = model.embed_tokens(ids_t).clone()
    starts = [i for i, t in enumerate(ids) if t == tok.im_start]
    if starts:
        if image_features is None:
            raise ValueError("the prompt has an image span but no image features were given")
        n = image_features.shape[1]
        for p in starts:
            if p + n + 1 >= len(ids) or ids[p + n + 1] != tok.im_end:
                raise ValueError(f"image span at {p} is not {n} <im_patch> tokens followed by <im_end>")
            emb[0, p + 1:p + 1 + n] = image_features[0]
    slots = [i for i, t in enumerate(ids) if t == tok.boxes]
    if slots:
        if region_boxes is None or region_boxes.shape[0] < len(slots):
            have = 0 if region_boxes is None else region_boxes.shape[0]
            raise ValueError(f"the prompt has {len(slots)} <boxes> slots but {have} boxes were given")
        emb[0, slots] = model.loc_encoder(region_boxes[:len(slots)].float())
    return emb


@torch.no_grad()
def generate(model: NextChat, ids: list[int], tok: TokenIds, *, image_features: torch.Tensor | None,
             region_boxes: torch.Tensor | None = None, sam_pixels: Callable[[], torch.Tensor] | None = None,
             max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
             keep_logits: bool = False,
             logits_processor: Callable[[int, np.ndarray], np.ndarray] | None = None) -> Generation:
    """Greedy or seeded sampling with trigger feedback. `sam_pixels` is called only if a trigger fired.

    `logits_processor(step, logits[V]) -> logits[V]` may reshape the scores before the choice (as HF's
    logits processors do); `step` counts generated tokens.
    """
    rng = sampling.rng()
    cache = DynamicCache()
    logits, hidden = model.llm_step(prefill_embeds(model, ids, tok, image_features, region_boxes), cache)
    fed = ids[-1]
    out: list[int] = []
    hiddens, feedbacks, step_logits = [], [], []
    finish = "length"
    while True:
        if fed == tok.at:
            _, feedback = model.loc_feedback(hidden)
            hiddens.append(hidden[0])
            feedbacks.append(feedback[0])
            nxt, emb = tok.boxes, feedback[:, None]
        else:
            if len(out) >= max_new_tokens:
                break
            lg = logits[0].float().numpy()
            if keep_logits:
                step_logits.append(lg)
            if logits_processor is not None:
                lg = logits_processor(len(out), lg)
            nxt = pick_token(lg, sampling, rng)
            emb = model.embed_tokens(torch.tensor([[nxt]]))
        out.append(nxt)
        if nxt == tok.eos:
            finish = "stop"
            break
        if len(out) >= max_new_tokens and nxt != tok.at:
            break   # at the limit: no step for a token nobody reads (an <at> still needs its hidden)
        logits, hidden = model.llm_step(emb, cache)
        fed = nxt
    h = model.config.llm.hidden_size
    trig = torch.stack(hiddens) if hiddens else torch.zeros(0, h)
    boxes = model.loc_decoder(trig) if hiddens else torch.zeros(0, 4)
    low_res = masks = iou = None
    if hiddens and sam_pixels is not None:
        image_embedding = model.sam_image_embedding(sam_pixels())
        low_res, iou, masks = model.sam_masks(image_embedding, boxes, trig)
    return Generation(token_ids=out, finish_reason=finish, trigger_hidden=trig, boxes=boxes,
                      low_res_logits=low_res, mask_logits=masks, iou=iou,
                      feedback_embeds=torch.stack(feedbacks) if feedbacks else torch.zeros(0, h),
                      step_logits=step_logits if keep_logits else None)
