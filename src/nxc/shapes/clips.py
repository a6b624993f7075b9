"""Moving-shapes clips (issue 29: video input and tracking): a shapes scene whose objects glide in straight lines.

    make_clip(rng, frames=8) ─▶ Clip(frames: RGB PIL images, objects: [(colour, shape)], boxes [T, K, 4] pixels)

One background, 1..max_objects objects of distinct (colour, shape), each from a start to an end centre inside the
picture, painted at each frame's centre (nxc.shapes.data's shapes and colours, so the kit's perception models see
what they were trained on). Boxes are the painted masks' extents (x2 / y2 exclusive). Torch-free, seeded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from nxc.shapes.data import COLOURS, SHAPES, _background, _shape_mask, bbox_of


@dataclass(frozen=True)
class Clip:
    frames: tuple
    objects: tuple                     # (colour, shape) per object
    boxes: np.ndarray                  # [T, K, 4] xyxy pixels, the painted masks' extents
    masks: np.ndarray                  # [T, K, H, W] bool, each object's painted pixels (later objects on top)


def make_clip(rng: np.random.Generator, *, frames: int = 8, side: int = 96, max_objects: int = 2,
              travel: float = 0.35) -> Clip:
    """A clip of `frames` side x side frames; each object moves up to `travel` x side between the first and last."""
    k = int(rng.integers(1, max_objects + 1))
    colours = list(COLOURS)
    kinds = rng.choice(len(colours) * len(SHAPES), size=k, replace=False)
    objects = tuple((colours[i // len(SHAPES)], SHAPES[i % len(SHAPES)]) for i in kinds)
    radii = rng.uniform(0.10, 0.16, k) * side
    start = np.stack([rng.uniform(r, side - r, 2) for r in radii])
    step = rng.uniform(-travel, travel, (k, 2)) * side
    end = np.stack([np.clip(s + d, r, side - r) for s, d, r in zip(start, step, radii)])
    bg = _background(rng, side, side)
    tints = [np.asarray(COLOURS[c], np.float32) + rng.normal(0, 6, 3) for c, _ in objects]
    pictures, boxes = [], np.zeros((frames, k, 4), np.float32)
    masks = np.zeros((frames, k, side, side), bool)
    for t in range(frames):
        a = t / max(1, frames - 1)
        img = bg.copy()
        for j, ((_, shape), r) in enumerate(zip(objects, radii)):
            cx, cy = start[j] * (1 - a) + end[j] * a
            mask = _shape_mask(shape, side, side, cx, cy, r)
            img[mask] = tints[j]
            masks[t, :j] &= ~mask                 # what a later object covers is not visible of an earlier one
            masks[t, j] = mask
            boxes[t, j] = bbox_of(mask)
        pictures.append(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB"))
    return Clip(frames=tuple(pictures), objects=objects, boxes=boxes, masks=masks)


def save_gif(clip: Clip, path, *, ms_per_frame: int = 125) -> None:
    clip.frames[0].save(path, save_all=True, append_images=list(clip.frames[1:]), duration=ms_per_frame, loop=0)
