"""Training conversations on shapes scenes, tokenized and labelled the way NExT-Chat trains.

One conversation = one scene and 1..3 question/answer turns in the vicuna_v1.1 template. Labels:
- token cross-entropy on every assistant token (and its `</s>`), except the `<boxes>` right after an
  `<at>` (masked, as NExT-Chat masks it to -100: that token is a placeholder whose embedding is replaced);
- a box target for every answer `<at>`: its output hidden goes through loc_decoder;
- every `<boxes>` slot (question or answer) is fed loc_encoder(ground-truth box) (teacher forcing).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from nxc.model import processing
from nxc.runtime.prompt import SLOT, Turn, expand_region_refs, render
from nxc.shapes.data import Obj, Sample, make_sample, make_scene

IGNORE = -100
TASK_WEIGHTS = {"rec": 0.35, "caption": 0.2, "region": 0.2, "pope": 0.25}


@dataclass
class Conversation:
    samples: list[Sample]


@dataclass
class Batch:
    ids: torch.Tensor            # [B,T] long, right-padded with 0
    attention: torch.Tensor      # [B,T] long
    labels: torch.Tensor         # [B,T] long, IGNORE where no loss; labels[t] is the token at t
    pixels: torch.Tensor         # [B,3,R,R] CLIP-normalised
    slot_pos: torch.Tensor       # [S,2] (row, position) of every <boxes> slot
    slot_boxes: torch.Tensor     # [S,4] normalised boxes fed at those slots
    at_pos: torch.Tensor         # [A,2] (row, position) of every answer <at>
    at_boxes: torch.Tensor       # [A,4] their ground-truth boxes (normalised)
    at_objects: list             # [A] (sample, Obj) for mask targets
    images: list


def sample_conversation(rng: np.random.Generator, max_turns: int = 3) -> Conversation:
    scene = make_scene(rng)
    n = int(rng.integers(1, max_turns + 1))
    tasks = rng.choice(list(TASK_WEIGHTS), size=n, p=list(TASK_WEIGHTS.values()))
    return Conversation([make_sample(rng, str(t), scene) for t in tasks])


def encode_conversation(conv: Conversation, tokenizer, num_image_tokens: int, at_id: int, boxes_id: int):
    """Token ids, labels, slot boxes (in slot order) and answer-trigger objects of one conversation."""
    image = conv.samples[0].image
    w, h = image.size
    turns: list[Turn] = []
    slot_boxes: list = []
    answer_objs: list[Obj] = []
    spans = []
    full = ""
    for s in conv.samples:
        q, order = expand_region_refs(s.question, len(s.boxes_in))
        slot_boxes += [s.boxes_in[i] for i in order]
        prefix = render(turns + [Turn(q)], num_image_tokens)
        full = prefix + " " + s.answer + "</s>"
        spans.append((len(tokenizer.encode(prefix)), len(tokenizer.encode(full))))
        slot_boxes += [o.box for o in s.answer_objects]
        answer_objs += [(s, o) for o in s.answer_objects]
        turns.append(Turn(q, s.answer))
    ids = tokenizer.encode(full)
    labels = [IGNORE] * len(ids)
    for a, b in spans:
        labels[a:b] = ids[a:b]
    ats = []
    for p, t in enumerate(ids):
        if t == boxes_id and p > 0 and ids[p - 1] == at_id:
            labels[p] = IGNORE
        if t == at_id and labels[p] != IGNORE:
            ats.append(p)
    if len(ats) != len(answer_objs):
        raise RuntimeError(f"tokenization lost a trigger: {len(ats)} <at> in answers, {len(answer_objs)} objects")
    if sum(t == boxes_id for t in ids) != len(slot_boxes):
        raise RuntimeError("tokenization lost a <boxes> slot")
    norm = processing.normalise_boxes(np.asarray(slot_boxes, np.float32).reshape(-1, 4), w, h)
    at_norm = processing.normalise_boxes(np.asarray([o.box for _, o in answer_objs], np.float32).reshape(-1, 4), w, h)
    return ids, labels, norm, ats, at_norm, answer_objs


def make_batch(convs: list[Conversation], tokenizer, *, image_size: int, num_image_tokens: int,
               at_id: int, boxes_id: int) -> Batch:
    enc = [encode_conversation(c, tokenizer, num_image_tokens, at_id, boxes_id) for c in convs]
    t_max = max(len(e[0]) for e in enc)
    b = len(enc)
    ids = torch.zeros(b, t_max, dtype=torch.long)
    att = torch.zeros(b, t_max, dtype=torch.long)
    labels = torch.full((b, t_max), IGNORE, dtype=torch.long)
    slot_pos, slot_boxes, at_pos, at_boxes, at_objects = [], [], [], [], []
    for r, (i, lab, norm, ats, at_norm, objs) in enumerate(enc):
        ids[r, :len(i)] = torch.tensor(i)
        att[r, :len(i)] = 1
        labels[r, :len(i)] = torch.tensor(lab)
        slot_pos += [(r, p) for p, t in enumerate(i) if t == boxes_id]
        slot_boxes.append(norm)
        at_pos += [(r, p) for p in ats]
        at_boxes.append(at_norm)
        at_objects += objs
    images = [c.samples[0].image for c in convs]
    pixels = torch.cat([processing.clip_pixels(im, image_size) for im in images])
    return Batch(ids=ids, attention=att, labels=labels, pixels=pixels,
                 slot_pos=torch.tensor(slot_pos, dtype=torch.long).reshape(-1, 2), slot_boxes=torch.cat(slot_boxes),
                 at_pos=torch.tensor(at_pos, dtype=torch.long).reshape(-1, 2), at_boxes=torch.cat(at_boxes),
                 at_objects=at_objects, images=images)


def sam_target(mask: np.ndarray, size: int) -> torch.Tensor:
    """A [H,W] bool mask on the original image -> [size,size] float in SAM's padded frame (§4.2 geometry)."""
    from PIL import Image
    h, w = mask.shape
    nw, nh = processing.sam_resized_size(w, h, size)
    m = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((nw, nh), Image.NEAREST)) > 127
    out = np.zeros((size, size), np.float32)
    left, top = (size - nw) // 2, (size - nh) // 2
    out[top:top + nh, left:left + nw] = m
    return torch.from_numpy(out)


__all__ = ["Batch", "Conversation", "IGNORE", "SLOT", "make_batch", "sample_conversation", "sam_target"]
