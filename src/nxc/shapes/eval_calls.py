"""`nxc-eval --tasks modules`: how a model answers pixel-level requests with VITRON module calls (issue 29, item 5).

Held-out requests of nxc.shapes.module_tasks (seeded scenes; n per module task) through the target:
- module choice: the reply's first call names the module the request needs (B segment, E track, C edit, A draw);
  a reply without a call, or with a malformed one, is wrong.
- instruction exact: the right module, and its instruction text is the request's (the object to segment, the new
  object of an edit or a drawing, copied right).
- region Acc@0.5: segment / track / edit: the call's region (the box the model's box head decoded at its `<at>`, or
  the numbers it wrote) has IoU >= 0.5 with the object's box; generate "in [0]": the region names input [0].
- segmentation IoU (a build with a segment backend): the call's mask against the object's mask, mean (a wrong or
  missing call scores 0).
- tracking mean IoU (a build with a track backend): a moving-shapes clip (nxc.shapes.clips) as the conversation's
  video, "Track the <object>."; the track's masks against each frame's mask, averaged over frames, then clips.
Generation and editing pictures are judged by `--tasks grounded-generation editing` (nxc.shapes.eval_modules).
"""
from __future__ import annotations

import sys
import time

import numpy as np

from nxc.module_calls import ModuleCall, ModuleCallParser
from nxc.shapes.data import make_scene
from nxc.shapes.module_tasks import MODULE_OF, MODULE_TASKS, module_sample

ROWS = (("module choice", "modules", "module_choice"), ("module instruction exact", "modules", "instruction_accuracy"),
        ("module region Acc@0.5", "modules", "region_acc@0.5"),
        ("module segmentation IoU", "modules", "segmentation_iou"), ("module tracking mean IoU", "modules",
                                                                       "tracking_mean_iou"))


def first_call(text: str) -> ModuleCall | None:
    p = ModuleCallParser()
    calls = [c for c in p.feed(text) + p.close() if isinstance(c, ModuleCall)]
    return calls[0] if calls else None


def _iou(a, b) -> float:
    from nxc.shapes.evaluate import box_iou
    return box_iou(a, b)


def _mask_iou(a: np.ndarray | None, b: np.ndarray) -> float:
    if a is None:
        return 0.0
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _region_box(result, call: ModuleCall):
    """The box the call's region stands for: the runtime's resolved box, else the numbers, else the box head's."""
    calls = getattr(result, "calls", None)
    if calls and calls[0].box is not None and calls[0].backend not in ("generate",):
        return calls[0].box
    if call.region is not None:
        return call.region
    if call.region_slot is not None and len(result.detections) > call.region_slot:
        return result.detections[call.region_slot].box
    return None


def evaluate_calls(chat, *, seed: int = 1234, n: int = 100, pipe=None, progress: bool = True) -> dict:
    """chat(image, text, boxes) -> a result with raw_text (or text) and detections; `pipe`: the build's Pipeline,
    for the backends' masks and tracks (None: a checkpoint, module choice and regions only)."""
    rng = np.random.default_rng([seed, 2929])
    per, regions, seg, said = {}, [], [], []
    t0 = time.perf_counter()
    for task in MODULE_TASKS:
        ok = 0
        for i in range(n):
            sample = module_sample(rng, task, make_scene(rng, max_objects=3))
            result = chat(sample.image, sample.question, sample.boxes_in or None)
            call = first_call(getattr(result, "raw_text", None) or result.text)
            right = call is not None and call.module == MODULE_OF[task]
            ok += right
            said.append(bool(right and call.instructions == first_call(sample.answer).instructions))
            if task == "module_generate":
                if sample.boxes_in:
                    regions.append(bool(right and call.region_ref == 0))
                continue
            box = _region_box(result, call) if right else None
            regions.append(box is not None and _iou(box, sample.target.box) >= 0.5)
            if task == "module_segment" and pipe is not None:
                calls = getattr(result, "calls", [])
                det = calls[0].detection if right and calls and calls[0].error is None else None
                seg.append(_mask_iou(None if det is None else det.mask, sample.target.mask))
        per[task] = ok / n
        if progress:
            print(f"  modules: {task} {ok}/{n} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    out = {"module_choice": float(np.mean(list(per.values()))), "per_task": per,
           "instruction_accuracy": float(np.mean(said)),
           "region_acc@0.5": float(np.mean(regions)) if regions else None,
           "segmentation_iou": float(np.mean(seg)) if seg else None, "n": n}
    if pipe is not None and pipe.manifest.modules is not None and any(
            e.backend == "track" for e in pipe.manifest.modules.calls.values()):
        out["tracking_mean_iou"] = track_iou(pipe, seed=seed, n=max(1, n // 4))
    out["meta"] = {"seed": seed, "seconds": time.perf_counter() - t0}
    return out


def track_iou(pipe, *, seed: int, n: int, frames: int = 8) -> float:
    """Mean over n clips of the track's mean mask IoU over frames ("Track the <object>." on the clip)."""
    from nxc.runtime.video import Video
    from nxc.shapes.clips import make_clip
    rng = np.random.default_rng([seed, 77])
    scores = []
    for _ in range(n):
        clip = make_clip(rng, frames=frames, max_objects=2)
        k = int(rng.integers(len(clip.objects)))
        colour, shape = clip.objects[k]
        r = pipe.chat(Video(clip.frames), f"Track the {colour} {shape}.", max_new_tokens=64)
        track = next((c.track for c in r.calls if c.track), [])
        if len(track) != frames:
            scores.append(0.0)
            continue
        scores.append(float(np.mean([_mask_iou(d.mask, clip.masks[t, k]) for t, d in enumerate(track)])))
    return float(np.mean(scores))
