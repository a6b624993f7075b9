"""Synthetic grounding data: coloured shapes with exact boxes and masks, and NExT-Chat-phrased tasks.

Torch-free (numpy + Pillow). Everything is drawn from a seeded numpy Generator, so a seed reproduces
a dataset exactly. Boxes are xyxy in original-image pixels, from the visible mask: x2/y2 exclusive.

Tasks (reference §3.5 phrasing):
- rec:     "Where is the red circle in the image?"              -> "Answer: <at> <boxes> ."
- caption: "Can you describe the image and include object locations?"
                                                   -> "a red circle <at> <boxes> and a blue star <at> <boxes> ."
- region:  "What is region [0]?" + a box                          -> "It is a red circle."
- pope:    "Is there a red circle in the image?" (half absent)    -> "Yes" / "No"
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from nxc.prompt import SLOT

COLOURS = {"red": (215, 35, 35), "green": (30, 150, 50), "blue": (35, 70, 215), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle", "star")
TASKS = ("rec", "caption", "region", "pope")

REC_TEMPLATES = ("Where is <expr> in the image?", "Can you locate <expr>?", "Please find <expr>.",
                 "Detect <expr> in the image?", "Where is <expr>?", "Can you point out <expr> in the image?")
CAPTION_TEMPLATES = ("Can you describe the image and include object locations?",
                     "Can you describe the image and detect objects?",
                     "Please describe the image and include object locations.")
REGION_TEMPLATES = ("What is region [0]?", "What is [0]?", "Describe region [0].", "What is the object in region [0]?")
POPE_TEMPLATES = ("Is there <obj> in the image?", "Is there <obj> in the picture?", "Does the image contain <obj>?")
REC_ANSWER = f"Answer: {SLOT} ."

MIN_SIDE, MAX_SIDE = 64, 192


@dataclass
class Obj:
    colour: str
    shape: str
    box: tuple[float, float, float, float]   # xyxy pixels of the visible mask, x2/y2 exclusive
    mask: np.ndarray                           # [H,W] bool, visible pixels

    @property
    def phrase(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]


@dataclass
class Sample:
    task: str
    image: Image.Image
    question: str
    answer: str                                   # uses "<at> <boxes>" for each detection
    boxes_in: list[tuple] = field(default_factory=list)     # region-input boxes (pixels)
    answer_objects: list[Obj] = field(default_factory=list)  # one per `<at> <boxes>` in the answer, in order
    target: Obj | None = None                     # rec/region: the object asked about
    present: bool | None = None                   # pope: ground truth
    scene_objects: list[Obj] = field(default_factory=list)  # every object of the image (proposal recall)


def _shape_mask(shape: str, w: int, h: int, cx: float, cy: float, r: float) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(canvas)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif shape == "square":
        s = r * 0.85
        d.rectangle((cx - s, cy - s, cx + s, cy + s), fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)], fill=255)
    elif shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else r * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return np.asarray(canvas) > 127


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    base = rng.integers(150, 256, 3).astype(np.float32)
    if rng.random() < 0.5:   # a gentle gradient
        other = rng.integers(150, 256, 3).astype(np.float32)
        t = np.linspace(0, 1, w if rng.random() < 0.5 else h, dtype=np.float32)
        t = t[None, :, None] if t.size == w else t[:, None, None]
        img = base * (1 - t) + other * t
        img = np.broadcast_to(img, (h, w, 3)).copy()
    else:
        img = np.broadcast_to(base, (h, w, 3)).copy()
    img += rng.normal(0, rng.uniform(0, 8), (h, w, 3)).astype(np.float32)
    return img


def bbox_of(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


def make_scene(rng: np.random.Generator, *, max_objects: int = 4) -> Scene:
    """1..max_objects objects with distinct (colour, shape), some overlapping, each >= 55% visible."""
    while True:
        w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
        n = int(rng.integers(1, max_objects + 1))
        kinds = rng.choice(len(COLOURS) * len(SHAPES), size=n, replace=False)
        allow_overlap = rng.random() < 0.35
        placed: list[tuple[str, str, np.ndarray]] = []
        for k in kinds:
            colour, shape = list(COLOURS)[k // len(SHAPES)], SHAPES[k % len(SHAPES)]
            for _ in range(40):
                r = rng.uniform(0.09, 0.17) * max(w, h)
                r = min(r, 0.45 * min(w, h))
                cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
                m = _shape_mask(shape, w, h, cx, cy, r)
                overlap = any((m & pm).any() for _, _, pm in placed)
                if not overlap or (allow_overlap and all((m & pm).sum() < 0.35 * pm.sum() for _, _, pm in placed)):
                    placed.append((colour, shape, m))
                    break
        if len(placed) != n:
            continue
        img = _background(rng, w, h)
        visible = []
        for i, (colour, shape, m) in enumerate(placed):
            later = np.zeros_like(m)
            for _, _, pm in placed[i + 1:]:
                later |= pm
            vis = m & ~later
            if vis.sum() < 0.55 * m.sum():
                break
            img[m] = np.asarray(COLOURS[colour], np.float32) + rng.normal(0, 6, 3)
            visible.append(Obj(colour, shape, bbox_of(vis), vis))
        if len(visible) == n:
            image = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
            return Scene(image=image, objects=visible)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def left_to_right(objects: list[Obj]) -> list[Obj]:
    return sorted(objects, key=lambda o: (o.box[0] + o.box[2], o.box[1] + o.box[3]))


def caption_answer(objects: list[Obj]) -> str:
    parts = [f"a {o.phrase} {SLOT}" for o in left_to_right(objects)]
    text = parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]
    return text + " ."


def make_sample(rng: np.random.Generator, task: str, scene: Scene | None = None, *, pope_near: float = 0.5) -> Sample:
    """One sample of `task`; pope: `pope_near` of the absent questions name an object sharing a colour or a shape
    with a present one (0.5 in the evaluation set)."""
    scene = scene or make_scene(rng)
    sample = _sample(rng, task, scene, pope_near)
    sample.scene_objects = list(scene.objects)
    return sample


def _sample(rng: np.random.Generator, task: str, scene: Scene, pope_near: float) -> Sample:
    if task.startswith("module_"):                  # VITRON-style module calls (nxc.shapes.module_tasks)
        from nxc.shapes.module_tasks import module_sample
        return module_sample(rng, task, scene)
    objs = scene.objects
    if task == "rec":
        o = _pick(rng, objs)
        q = _pick(rng, REC_TEMPLATES).replace("<expr>", f"the {o.phrase}")
        return Sample(task, scene.image, q, REC_ANSWER, answer_objects=[o], target=o)
    if task == "caption":
        return Sample(task, scene.image, _pick(rng, CAPTION_TEMPLATES), caption_answer(objs),
                      answer_objects=left_to_right(objs))
    if task == "region":
        o = _pick(rng, objs)
        return Sample(task, scene.image, _pick(rng, REGION_TEMPLATES), f"It is a {o.phrase}.",
                      boxes_in=[o.box], target=o)
    if task == "pope":
        present = rng.random() < 0.5
        have = {(o.colour, o.shape) for o in objs}
        if present:
            colour, shape = _pick(rng, sorted(have))
        else:
            absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in have]
            # adversarial half: an absent object that shares a colour or a shape with a present one
            near = [(c, s) for c, s in absent if any(c == hc or s == hs for hc, hs in have)]
            colour, shape = _pick(rng, near if near and rng.random() < pope_near else absent)
        q = _pick(rng, POPE_TEMPLATES).replace("<obj>", f"a {colour} {shape}")
        return Sample(task, scene.image, q, "Yes" if present else "No", present=present,
                      target=Obj(colour, shape, (0, 0, 0, 0), np.zeros((1, 1), bool)))
    raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")


def make_samples(seed: int, n_per_task: int, tasks=TASKS) -> list[Sample]:
    """A reproducible evaluation set: n_per_task samples of each task, each on its own scene."""
    rng = np.random.default_rng(seed)
    return [make_sample(rng, t) for t in tasks for _ in range(n_per_task)]


def phrases_in(text: str) -> list[tuple[str, str]]:
    """(colour, shape) pairs named in a reply, in order."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    return [(a, b) for a, b in zip(words, words[1:]) if a in COLOURS and b in SHAPES]


def corpus_sentences() -> list[str]:
    """Every kind of text the tasks produce (with `<at> <boxes>` slots), for training the tokenizer."""
    out = []
    for c in COLOURS:
        for s in SHAPES:
            e = f"the {c} {s}"
            out += [t.replace("<expr>", e) for t in REC_TEMPLATES]
            out += [t.replace("<obj>", f"a {c} {s}") for t in POPE_TEMPLATES]
            out += [f"It is a {c} {s}.", f"a {c} {s} {SLOT} , a {c} {s} {SLOT} and a {c} {s} {SLOT} ."]
    out += list(CAPTION_TEMPLATES) + list(REGION_TEMPLATES) + [REC_ANSWER, "Yes", "No"]
    return out
