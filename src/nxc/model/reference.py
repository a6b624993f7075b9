"""The reference chat: image + text (+ region boxes) in, reply text + pixel boxes + boolean masks out.

This is what every exported graph and the runtime are compared with. Batch 1, float32.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from nxc import names
from nxc.model import processing
from nxc.model.checkpoint import load_nextchat
from nxc.model.generate import Generation, TokenIds, generate
from nxc.model.nextchat import NextChat
from nxc.prompt import Turn, prompt_segments, render_reply
from nxc.sampling import SamplingParams


@dataclass
class Detection:
    box: np.ndarray          # [4] xyxy, original-image pixels (not clamped)
    box_norm: np.ndarray     # [4] xyxy normalised to the padded square
    mask: np.ndarray | None  # [H,W] bool on the original image
    score: float | None      # SAM's IoU prediction


@dataclass
class ChatResult:
    text: str                        # decoded reply, each `<at> <boxes>` rendered as [k]
    raw_text: str                    # decoded reply with `<at> <boxes>` kept
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    detections: list[Detection] = field(default_factory=list)
    generation: Generation | None = None


class ReferenceChat:
    def __init__(self, *, model: NextChat, tokenizer):
        self.model = model.eval()
        self.tokenizer = tokenizer
        ids = tokenizer.added_token_ids
        self.token_ids = TokenIds(im_patch=ids[names.IM_PATCH], im_start=ids[names.IM_START],
                                  im_end=ids[names.IM_END], at=ids[names.AT], boxes=ids[names.BOXES],
                                  eos=tokenizer.eos_id)

    @classmethod
    def load(cls, ckpt: str | Path, *, clip_dir=None, sam_file=None) -> "ReferenceChat":
        model, tokenizer = load_nextchat(ckpt, clip_dir=clip_dir, sam_file=sam_file)
        return cls(model=model, tokenizer=tokenizer)

    @torch.no_grad()
    def chat(self, image: Image.Image, text: str, *, boxes=None, history: list[Turn] | None = None,
             history_boxes=None, history_regions=(), max_new_tokens: int = 64, sampling: SamplingParams = SamplingParams(),
             iou_threshold: float | None = 0.3, keep_logits: bool = False,
             logits_processor=None, special_tokens_in_text: bool = False, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False) -> ChatResult:
        """One turn. `boxes`: [M,4] region-input boxes in original pixels, referenced as [i] in `text`.

        `history` holds earlier turns (user texts as typed, with their [i] references; replies as decoded, with
        `<at> <boxes>`) and `history_boxes` the normalised boxes of their `<boxes>` slots in order;
        `history_regions` the places in history_boxes of the user's regions (a region extractor encodes those, and
        this turn's boxes; the model's own boxes keep loc_encoder rows).
        special_tokens_in_text: special-token strings in the user texts and replies become tokens, as in the
        original model (default: they are plain text; see nxc.prompt).
        """
        cfg = self.model.config
        image = image.convert("RGB")
        w, h = image.size
        boxes_px = np.zeros((0, 4), np.float32) if boxes is None else np.asarray(boxes, np.float32).reshape(-1, 4)
        segments, order = prompt_segments(text, num_image_tokens=cfg.num_image_tokens, num_boxes=len(boxes_px),
                                          history=history, special_tokens_in_text=special_tokens_in_text)
        region = processing.normalise_boxes(boxes_px[order], w, h) if order else torch.zeros(0, 4)
        earlier = 0
        if history_boxes is not None and len(history_boxes):
            earlier = len(history_boxes)
            region = torch.cat([torch.as_tensor(np.asarray(history_boxes), dtype=torch.float32), region])
        is_input = [k in set(history_regions) or k >= earlier for k in range(len(region))]
        ids = self.tokenizer.encode_segments(segments)
        pixels = processing.clip_preprocess_of(self.model).pixels(image)
        patches = None
        if getattr(self.model, "region_encoder", None) is not None:
            features, patches = self.model.encode_image_parts(pixels)
            patches = patches[0]
        else:
            features = self.model.encode_image(pixels)
        gen = generate(self.model, ids, self.token_ids, image_features=features, region_boxes=region,
                       region_is_input=is_input, patch_features=patches,
                       sam_pixels=lambda: processing.sam_pixels(image, cfg.sam.image_size),
                       max_new_tokens=max_new_tokens, sampling=sampling, keep_logits=keep_logits,
                       logits_processor=logits_processor, num_beams=num_beams, length_penalty=length_penalty,
                       early_stopping=early_stopping)
        detections = []
        if len(gen.boxes):
            px = processing.boxes_to_pixels(gen.boxes, w, h).numpy()
            masks = processing.masks_to_image(gen.mask_logits, gen.iou, w, h, iou_threshold).numpy()
            for k in range(len(gen.boxes)):
                detections.append(Detection(box=px[k], box_norm=gen.boxes[k].numpy(), mask=masks[k],
                                            score=float(gen.iou[k, 0])))
        raw = self.tokenizer.decode(gen.token_ids)
        return ChatResult(text=render_reply(raw), raw_text=raw, token_ids=gen.token_ids, prompt_ids=ids,
                          finish_reason=gen.finish_reason, detections=detections, generation=gen)
