"""Pictures and captions for training the embedded NExT-GPT's generator: square shapes scenes with 1..3 objects.

Torch-free (numpy + Pillow), seeded like nxc.shapes.data: a numpy Generator reproduces a batch exactly. The scenes
use nxc.shapes.data's shapes, colours and backgrounds, so the pictures stay in the distribution the kit's perception
models (NExT-Chat, the proposal detector) were trained on; they differ in three ways that make a picture easy to
draw and to judge: the picture is square (`side` pixels), objects never overlap, and there are at most 3.

Captions are the kit's phrasing of a drawing request without its verb: "Draw a red circle and a blue square." asks
for the caption "a red circle and a blue square"; three objects read "a red circle, a blue square and a green star".
Objects are named in a random order, so the caption says what is there, not where.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from nxc.shapes.data import COLOURS, SHAPES, _background, _shape_mask

SUPERSAMPLE = 4          # shapes are drawn at side * SUPERSAMPLE and box-filtered down: anti-aliased edges
GAP = 1.15               # centres at least GAP * (r1 + r2) apart: no two objects touch


def caption_of(phrases: list[tuple[str, str]]) -> str:
    """[(colour, shape), ...] -> "a red circle", "a red circle and a blue square",
    "a red circle, a blue square and a green star" (an empty list -> "", the unconditional caption)."""
    names = [f"a {c} {s}" for c, s in phrases]
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


def caption_words() -> list[str]:
    """Every word a caption uses (the tokenizer makes each one token); "," is a single character already."""
    return ["a", "and", *COLOURS, *SHAPES]


def make_picture(rng: np.random.Generator, *, side: int, max_objects: int = 3
                 ) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """One scene: ([side, side, 3] uint8 RGB, [(colour, shape), ...] in drawing order). 1..max_objects objects with
    distinct (colour, shape), radius 11-20% of the side, apart from each other and inside the picture."""
    pic, phrases, _ = make_grounded_picture(rng, side=side, max_objects=max_objects)
    return pic, phrases


def make_grounded_picture(rng: np.random.Generator, *, side: int, max_objects: int = 3
                          ) -> tuple[np.ndarray, list[tuple[str, str]], np.ndarray]:
    """make_picture's scene (the same draws) with each object's box: [K, 4] float32 xyxy fractions of the side, the
    painted shape's extent (GLIGEN's training boxes)."""
    big = side * SUPERSAMPLE
    while True:
        n = int(rng.integers(1, max_objects + 1))
        kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
        placed = _place(rng, n, big)
        if placed:
            break
    phrases = [(list(COLOURS)[k // len(SHAPES)], SHAPES[k % len(SHAPES)]) for k in kinds]
    boxes: list = []
    return _paint(rng, phrases, placed, side, boxes), phrases, np.asarray(boxes, np.float32).reshape(-1, 4)


def picture_of(rng: np.random.Generator, phrases: list[tuple[str, str]], *, side: int) -> np.ndarray:
    """[side, side, 3] uint8: a scene of exactly these (colour, shape) objects, placed and painted as make_picture's
    (the true picture of a drawing request: what a perfect generator would draw)."""
    return grounded_picture_of(rng, phrases, side=side)[0]


def grounded_picture_of(rng: np.random.Generator, phrases: list[tuple[str, str]], *, side: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """picture_of's picture (the same draws) and its objects' boxes [K, 4], xyxy fractions of the side."""
    big = side * SUPERSAMPLE
    while not (placed := _place(rng, len(phrases), big)):
        pass
    boxes: list = []
    return _paint(rng, list(phrases), placed, side, boxes), np.asarray(boxes, np.float32).reshape(-1, 4)


def _place(rng: np.random.Generator, n: int, big: int) -> list[tuple[float, float, float]] | None:
    """n (cx, cy, r) in a big x big canvas, apart from each other and inside it; None when 60 * n tries fail."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(60 * n):
        if len(placed) == n:
            break
        r = rng.uniform(0.11, 0.20) * big
        cx, cy = rng.uniform(r, big - r), rng.uniform(r, big - r)
        if all(np.hypot(cx - x, cy - y) > GAP * (r + q) for x, y, q in placed):
            placed.append((cx, cy, r))
    return placed if len(placed) == n else None


def _paint(rng: np.random.Generator, phrases, placed, side: int, boxes: list | None = None) -> np.ndarray:
    """The picture; each object's box (xyxy fractions of the side, x2 / y2 exclusive) appended to `boxes`."""
    big = side * SUPERSAMPLE
    img = _background(rng, big, big)
    for (colour, shape), (cx, cy, r) in zip(phrases, placed):
        mask = _shape_mask(shape, big, big, cx, cy, r)
        img[mask] = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 6, 3)
        if boxes is not None:
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min() / big, ys.min() / big, (xs.max() + 1) / big, (ys.max() + 1) / big])
    return np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB").resize((side, side), Image.BOX))


def make_batch(rng: np.random.Generator, n: int, *, side: int, max_objects: int = 3, uncond_prob: float = 0.1
               ) -> tuple[np.ndarray, list[str]]:
    """n pictures and their captions: ([n, 3, side, side] float32 in [-1, 1], n captions). Each caption is "" with
    probability `uncond_prob` (classifier-free guidance learns the unconditional prediction from those)."""
    pics, captions = [], []
    for _ in range(n):
        pic, phrases = make_picture(rng, side=side, max_objects=max_objects)
        order = rng.permutation(len(phrases))
        text = caption_of([phrases[i] for i in order])
        pics.append(pic)
        captions.append("" if rng.random() < uncond_prob else text)
    x = np.stack(pics).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return x, captions


def make_grounded_batch(rng: np.random.Generator, n: int, *, side: int, max_objects: int = 3,
                        uncond_prob: float = 0.1, ungrounded_prob: float = 0.1
                        ) -> tuple[np.ndarray, list[str], list[tuple[list[str], np.ndarray]]]:
    """make_batch's pictures and captions with each picture's grounding, ([phrases], boxes [K, 4] in [0, 1]): the
    objects' phrases ("a red circle") and boxes, or none with probability `ungrounded_prob` (GLIGEN trains with its
    grounding dropped too, so that the null slots mean "no object")."""
    pics, captions, grounding = [], [], []
    for _ in range(n):
        pic, phrases, boxes = make_grounded_picture(rng, side=side, max_objects=max_objects)
        order = rng.permutation(len(phrases))
        pics.append(pic)
        captions.append("" if rng.random() < uncond_prob else caption_of([phrases[i] for i in order]))
        if rng.random() < ungrounded_prob:
            grounding.append(([], np.zeros((0, 4), np.float32)))
        else:
            grounding.append(([caption_of([p]) for p in phrases], boxes))
    x = np.stack(pics).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    return x, captions, grounding


def request_captions(seed: int, n: int, *, max_objects: int = 3) -> list[str]:
    """n captions of random scenes (no pictures drawn): held-out drawing requests, e.g. for a sample grid."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        kinds = rng.choice(len(COLOURS) * len(SHAPES), size=k, replace=False)
        out.append(caption_of([(list(COLOURS)[i // len(SHAPES)], SHAPES[i % len(SHAPES)]) for i in kinds]))
    return out
