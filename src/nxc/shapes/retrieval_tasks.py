"""The shapes tasks in ChatRex's phrasing, for the retrieval family (nxc.model.retrieval). Torch-free.

The same scenes and samples as the NExT-Chat tasks (nxc.shapes.data): each sample's question is asked the way a
retrieval model is asked, and its answer names object indices instead of `<at> <boxes>`:

- rec:     "Please detect the red circle in this image. Answer the question with object indexes."
                                                    -> "<ground>the red circle</ground><objects><obj2></objects>"
- caption: "Please briefly describe this image and detect all the mentioned objects. Answer with grounded object
            indexes."                               -> "<ground>a red circle</ground><objects><obj0></objects> and ..."
- region:  "What is region [0]?" + a box (the box joins the object list)  -> "It is a red circle."
- pope:    "Is there a red circle in the image?"    -> "Yes" / "No"
"""
from __future__ import annotations

import numpy as np

from nxc.object_index import GROUND_CLOSE, GROUND_OPEN, OBJECTS_CLOSE, OBJECTS_OPEN, obj_token
from nxc.shapes.data import Obj, Sample, left_to_right

REC_TEMPLATES = ("Please detect <expr> in this image. Answer the question with object indexes.",
                 "Where is <expr> in the image? Answer the question with object indexes.",
                 "Can you locate <expr>? Answer with object indexes.")
CAPTION_TEMPLATES = ("Please briefly describe this image and detect all the mentioned objects. Answer with grounded "
                     "object indexes.",
                     "Describe the image and ground every object you mention with its object index.")


def grounded(phrase: str, indices: list[int]) -> str:
    return f"{GROUND_OPEN}{phrase}{GROUND_CLOSE}{OBJECTS_OPEN}{''.join(obj_token(i) for i in indices)}{OBJECTS_CLOSE}"


def question(sample: Sample, template: int = 0) -> str:
    """The sample's question as a retrieval model is asked it (template k of its task; POPE and region as they are)."""
    if sample.task == "rec":
        return REC_TEMPLATES[template % len(REC_TEMPLATES)].replace("<expr>", f"the {sample.target.phrase}")
    if sample.task == "caption":
        return CAPTION_TEMPLATES[template % len(CAPTION_TEMPLATES)]
    return sample.question


def answer(sample: Sample, index_of: dict[int, int]) -> str:
    """The answer naming objects by their index in the object list; index_of: id(scene object) -> index."""
    if sample.task == "rec":
        return grounded(f"a {sample.target.phrase}", [index_of[id(sample.target)]])
    if sample.task == "caption":
        parts = [grounded(f"a {o.phrase}", [index_of[id(o)]]) for o in left_to_right(sample.answer_objects)]
        return (parts[0] if len(parts) == 1 else " , ".join(parts[:-1]) + " and " + parts[-1]) + " ."
    return sample.answer


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[N,4] x [M,4] xyxy -> [N,M]."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None] - inter, 1e-9)


def object_list(objects: list[Obj], gt_norm: np.ndarray, rng: np.random.Generator, *,
                proposals: np.ndarray | None = None, jitter: float = 0.08,
                distractors: float = 0.3) -> tuple[np.ndarray, dict[int, int]]:
    """The object list a training prompt shows, [P,4] normalised, and id(object) -> its index.

    proposals given (a detector's, after its filter): the list is theirs, each object named by its best proposal
    (IoU >= 0.5); an object no proposal finds is appended with its true box. Otherwise: the true boxes with each
    side moved by up to `jitter` of the box size, and with probability `distractors` one or two boxes that overlap
    no object much (a detector's false positives), in random order."""
    if proposals is not None and len(proposals):
        boxes = [b for b in np.asarray(proposals, np.float32)]
        iou = box_iou(gt_norm, np.asarray(proposals, np.float32))
        index_of = {}
        for k, o in enumerate(objects):
            j = int(iou[k].argmax())
            if iou[k, j] >= 0.5:
                index_of[id(o)] = j
            else:
                index_of[id(o)] = len(boxes)
                boxes.append(gt_norm[k])
        return np.asarray(boxes, np.float32).reshape(-1, 4), index_of
    boxes = []
    for b in gt_norm:
        w, h = b[2] - b[0], b[3] - b[1]
        d = rng.uniform(-jitter, jitter, 4) * np.array([w, h, w, h])
        boxes.append(np.clip(b + d, 0, 1))
    if rng.random() < distractors:
        for _ in range(int(rng.integers(1, 3))):
            for _ in range(20):
                cx, cy, s = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.08, 0.3)
                cand = np.clip(np.array([cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2], np.float32), 0, 1)
                if box_iou(cand[None], gt_norm).max() < 0.3:
                    boxes.append(cand)
                    break
    order = rng.permutation(len(boxes))
    out = np.asarray(boxes, np.float32)[order]
    where = {int(o): i for i, o in enumerate(order)}
    return out, {id(o): where[k] for k, o in enumerate(objects)}
