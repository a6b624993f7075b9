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
from nxc.prompt import Turn, expand_region_refs, render
from nxc.shapes.data import COLOURS, SHAPES, Obj, Sample, make_sample, make_scene

IGNORE = -100
TASK_WEIGHTS = {"rec": 0.35, "caption": 0.2, "region": 0.2, "pope": 0.25}


@dataclass
class Conversation:
    samples: list[Sample]
    scene: object = None


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
    patch_labels: torch.Tensor | None = None   # [B,N] object class under each CLIP patch (0 = background)
    patch_boxes: torch.Tensor | None = None    # [B,N,4] that object's normalised box
    look_pos: torch.Tensor | None = None       # [L,2] (row, position) whose output is about one object
    look_class: torch.Tensor | None = None     # [L] that object's class (as in patch_labels)


def sample_conversation(rng: np.random.Generator, max_turns: int = 3, max_objects: int = 4,
                        task_weights: dict | None = None, pope_near: float = 0.5) -> Conversation:
    weights = task_weights or TASK_WEIGHTS
    scene = make_scene(rng, max_objects=max_objects)
    n = int(rng.integers(1, max_turns + 1))
    p = list(weights.values()) if task_weights is None else np.asarray(list(weights.values()), float) / sum(weights.values())
    tasks = rng.choice(list(weights), size=n, p=p)
    return Conversation([make_sample(rng, str(t), scene, pope_near=pope_near) for t in tasks], scene)


def encode_conversation(conv: Conversation, tokenizer, num_image_tokens: int, at_id: int, boxes_id: int,
                        look_absent: bool = False):
    """Token ids, labels, slot boxes (in slot order) and answer-trigger objects of one conversation.
    look_absent: a POPE turn about an absent object gets look targets too, on the background (class 0)."""
    image = conv.samples[0].image
    w, h = image.size
    turns: list[Turn] = []
    slot_boxes: list = []
    answer_objs: list[Obj] = []
    spans, looks = [], []   # looks: (first position, end position, object) per turn that is about one object
    full = ""
    for s in conv.samples:
        q, order = expand_region_refs(s.question, len(s.boxes_in))
        slot_boxes += [s.boxes_in[i] for i in order]
        prefix = render(turns + [Turn(q)], num_image_tokens)
        full = prefix + " " + s.answer + "</s>"
        span = (len(tokenizer.encode(prefix)), len(tokenizer.encode(full)))
        spans.append(span)
        if s.target is not None and (s.task != "pope" or s.present):
            obj = next(o for o in conv.scene.objects if (o.colour, o.shape) == (s.target.colour, s.target.shape))
            looks.append((span[0] - 1, span[1] - 1, obj))
        elif s.task == "pope" and look_absent:
            looks.append((span[0] - 1, span[1] - 1, None))
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
    look = [(p, object_class(o)) for a, b, o in looks for p in range(a, b)]
    look += [(p, object_class(o)) for p, (smp, o) in zip(ats, answer_objs) if smp.task == "caption"]
    return ids, labels, norm, ats, at_norm, answer_objs, look


def object_class(o: Obj | None) -> int:
    if o is None:
        return 0   # background
    return 1 + list(COLOURS).index(o.colour) * len(SHAPES) + SHAPES.index(o.shape)


def make_batch(convs: list[Conversation], tokenizer, *, image_size: int, num_image_tokens: int,
               at_id: int, boxes_id: int, look_absent: bool = False) -> Batch:
    enc = [encode_conversation(c, tokenizer, num_image_tokens, at_id, boxes_id, look_absent) for c in convs]
    t_max = max(len(e[0]) for e in enc)
    b = len(enc)
    ids = torch.zeros(b, t_max, dtype=torch.long)
    att = torch.zeros(b, t_max, dtype=torch.long)
    labels = torch.full((b, t_max), IGNORE, dtype=torch.long)
    slot_pos, slot_boxes, at_pos, at_boxes, at_objects, look_pos, look_class = [], [], [], [], [], [], []
    for r, (i, lab, norm, ats, at_norm, objs, look) in enumerate(enc):
        look_pos += [(r, p) for p, _ in look]
        look_class += [c for _, c in look]
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
    patch = image_size // int(round(num_image_tokens ** 0.5))
    targets = [vision_targets(c.scene, image_size, patch) for c in convs]
    return Batch(ids=ids, attention=att, labels=labels, pixels=pixels,
                 slot_pos=torch.tensor(slot_pos, dtype=torch.long).reshape(-1, 2), slot_boxes=torch.cat(slot_boxes),
                 at_pos=torch.tensor(at_pos, dtype=torch.long).reshape(-1, 2), at_boxes=torch.cat(at_boxes),
                 at_objects=at_objects, images=images, patch_labels=torch.stack([t[0] for t in targets]),
                 patch_boxes=torch.stack([t[1] for t in targets]),
                 look_pos=torch.tensor(look_pos, dtype=torch.long).reshape(-1, 2),
                 look_class=torch.tensor(look_class, dtype=torch.long))


def vision_targets(scene, image_size: int, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch targets in the CLIP frame: class [N] (0 = background, 1 + colour*4 + shape) and box [N,4]."""
    from PIL import Image

    w, h = scene.image.size
    side, dx, dy = processing.square_offset(w, h)
    g = image_size // patch
    cover = []
    for o in scene.objects:
        sq = np.zeros((side, side), np.float32)
        sq[dy:dy + h, dx:dx + w] = o.mask
        cover.append(np.asarray(Image.fromarray(sq).resize((g, g), Image.BOX)))
    cover = np.stack(cover)                                         # [K,g,g] covered fraction
    best = cover.argmax(0).reshape(-1)
    has = cover.max(0).reshape(-1) > 0.2
    kinds = np.array([object_class(o) for o in scene.objects])
    labels = np.where(has, kinds[best], 0)
    boxes = processing.normalise_boxes(np.array([o.box for o in scene.objects], np.float32), w, h).numpy()
    return torch.from_numpy(labels).long(), torch.from_numpy(boxes[best])


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

