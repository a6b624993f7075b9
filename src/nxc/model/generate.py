"""Reference generation with NExT-Chat's trigger feedback (reference §5), batch 1.

           prompt ids ──▶ embed ──┬─ image rows  ◀── encode_image(pixels)
                                  └─ <boxes> rows ◀── loc_encoder(region boxes)
                                          │
                                          ▼
      ┌──────────────▶ llm_step(embeds, cache) ──▶ logits, hidden h
      │                                                │       (the loop: nxc.decode.decode_loop)
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

from nxc.decode import assemble_prefill, beam_search, decode_loop
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

    @property
    def never_sampled(self) -> tuple[int, ...]:
        """Ids the loop may not sample (nxc.sampling.pick_token's `banned`): `<boxes>`, which only the `<at>` head
        emits, and the image span's tokens. The runtime bans the same ids (its heads' `emit` and the image span)."""
        return (self.boxes, self.im_start, self.im_patch, self.im_end)


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
                   region_boxes: torch.Tensor | None, region_is_input=None,
                   patch_features: torch.Tensor | None = None) -> torch.Tensor:
    """[1,T,H]: token embeddings, image rows after each `<im_start>`, loc_encoder rows at `<boxes>` (§5.1); with a
    region extractor, the slots whose value is a user's region (region_is_input[k]) take its rows
    (NextChat.slot_rows; patch_features [N,Dv] of the image)."""
    def features() -> np.ndarray:
        if image_features is None:
            raise ValueError("the prompt has an image span but no image features were given")
        return image_features[0].numpy()

    n_slots = ids.count(tok.boxes)
    have = 0 if region_boxes is None else region_boxes.shape[0]
    if have < n_slots:
        raise ValueError(f"the prompt has {n_slots} <boxes> slots but {have} boxes were given")
    rows = model.embed_tokens(torch.tensor([ids], dtype=torch.long))[0].numpy()
    n_img = model.config.num_image_tokens if image_features is None else image_features.shape[1]
    emb = assemble_prefill(ids, rows, image_span=(tok.im_start, tok.im_end, n_img), image_features=features,
                           slot=tok.boxes, num_slot_values=n_slots,
                           slot_rows=lambda ks: model.slot_rows(
                               region_boxes[ks].float(), None if region_is_input is None else
                               [bool(region_is_input[k]) for k in ks], patch_features).numpy())
    return torch.from_numpy(emb)[None]


@torch.no_grad()
def generate(model: NextChat, ids: list[int], tok: TokenIds, *, image_features: torch.Tensor | None,
             region_boxes: torch.Tensor | None = None, region_is_input=None,
             patch_features: torch.Tensor | None = None, sam_pixels: Callable[[], torch.Tensor] | None = None,
             max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
             keep_logits: bool = False,
             logits_processor: Callable[[int, np.ndarray], np.ndarray] | None = None,
             num_beams: int = 1, length_penalty: float = 1.0, early_stopping: bool | str = False) -> Generation:
    """Greedy or seeded sampling with trigger feedback (the loop is nxc.decode's, shared with the runtime).
    `sam_pixels` is called only if a trigger fired.

    `logits_processor(step, logits[V]) -> logits[V]` may reshape the scores before the choice (as HF's
    logits processors do); `step` counts generated tokens.
    num_beams > 1: beam search (nxc.decode.beam_search, Hugging Face's semantics), greedy only; each beam keeps
    its own trigger hiddens.
    """
    rng = sampling.rng()
    cache = DynamicCache()
    logits, hidden = model.llm_step(prefill_embeds(model, ids, tok, image_features, region_boxes, region_is_input,
                                                   patch_features), cache)
    step_logits = []

    def pick(logits, n):
        lg = logits[0].float().numpy()
        if keep_logits:
            step_logits.append(lg)
        if logits_processor is not None:
            lg = logits_processor(n, lg)
        return pick_token(lg, sampling, rng, banned=tok.never_sampled)

    def step(token, x):
        return model.llm_step(model.embed_tokens(torch.tensor([[token]])) if x is None else x, cache)

    def loc_head(rows):                    # every row fed <at> this step; found: (hidden, feedback) per row
        out = []
        for hidden in rows:
            _, feedback = model.loc_feedback(hidden)
            out.append((tok.boxes, feedback[:, None], (hidden[0], feedback[0])))
        return out

    if num_beams > 1:
        if sampling.temperature > 0 or keep_logits or logits_processor is not None:
            raise ValueError("beam search here is greedy: no sampling, kept logits or logits processor with it")

        def step_beams(order, tokens, xs):
            cache.reorder_cache(torch.tensor(order))
            emb = torch.cat([model.embed_tokens(torch.tensor([[t]])) if x is None else x for t, x in zip(tokens, xs)])
            lg, hid = model.llm_step(emb, cache)
            return lg.float().numpy(), [hid[i:i + 1] for i in range(len(order))]

        hyp = beam_search(logits=logits[0].float().numpy(), hidden=hidden, fed=ids[-1], step=step_beams,
                          heads={tok.at: loc_head}, num_beams=num_beams, max_new=max_new_tokens, eos=tok.eos,
                          length_penalty=length_penalty, early_stopping=early_stopping, banned=tok.never_sampled)
        out, found = hyp.tokens, hyp.found
    else:
        out, found = [], []
        for t, f in decode_loop(logits=logits, hidden=hidden, fed=ids[-1], step=step, pick=pick,
                                heads={tok.at: loc_head}, max_new=max_new_tokens, eos=tok.eos):
            out.append(t)
            if f is not None:
                found.append(f)
    hiddens, feedbacks = [f[0] for f in found], [f[1] for f in found]
    h = model.config.llm.hidden_size
    trig = torch.stack(hiddens) if hiddens else torch.zeros(0, h)
    boxes = model.loc_decoder(trig) if hiddens else torch.zeros(0, 4)
    low_res = masks = iou = None
    if hiddens and sam_pixels is not None:
        image_embedding = model.sam_image_embedding(sam_pixels())
        low_res, iou, masks = model.sam_masks(image_embedding, boxes, trig)
    return Generation(token_ids=out, finish_reason="stop" if out and out[-1] == tok.eos else "length",
                      trigger_hidden=trig, boxes=boxes, low_res_logits=low_res, mask_logits=masks, iou=iou,
                      feedback_embeds=torch.stack(feedbacks) if feedbacks else torch.zeros(0, h),
                      step_logits=step_logits if keep_logits else None)
