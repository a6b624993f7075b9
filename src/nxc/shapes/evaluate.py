"""`nxc-eval`: grounding accuracy on a seeded held-out shapes set, through greedy generation.

Metrics (reference §7, on our synthetic tasks):
- REC: first detection's box vs the target box; Acc@0.5 (IoU >= 0.5) and mean IoU (no detection = 0).
- RES: the same REC queries' masks; cIoU = total intersection / total union. As in NExT-Chat's RES eval,
  a reply with other than exactly one detection counts as an empty mask; no 0.3 IoU-score filter.
- POPE: "yes" if the reply contains it; accuracy, precision, recall, F1, yes-ratio (yes = positive).
- region caption: the first colour+shape the reply names equals the region's object.
- grounded caption: F1 of (phrase, box with IoU >= 0.5) pairs against the scene's objects.

The chat function is pluggable: the PyTorch reference now, a build directory through the runtime later.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np

from nxc.shapes.data import TASKS, make_samples, phrases_in

ChatFn = Callable[..., object]   # (image, text, boxes) -> object with .text and .detections[.box, .mask]


def box_iou(a, b) -> float:
    """IoU of xyxy boxes as given: a box with x2 < x1 or y2 < y1 has no area (a swapped box is a wrong box)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


class Scores:
    def __init__(self):
        self.rec_iou: list[float] = []
        self.res_inter = 0
        self.res_union = 0
        self.pope: list[tuple[bool, bool]] = []   # (truth, said yes)
        self.region: list[bool] = []
        self.cap_tp = self.cap_pred = self.cap_true = 0

    def add(self, sample, result) -> None:
        dets = list(result.detections)
        if sample.task == "rec":
            t = sample.target
            self.rec_iou.append(box_iou(dets[0].box, t.box) if dets else 0.0)
            pred = dets[0].mask if len(dets) == 1 and dets[0].mask is not None else np.zeros_like(t.mask)
            self.res_inter += int((pred & t.mask).sum())
            self.res_union += int((pred | t.mask).sum())
        elif sample.task == "pope":
            self.pope.append((bool(sample.present), "yes" in result.text.lower()))
        elif sample.task == "region":
            said = phrases_in(result.text)
            self.region.append(bool(said) and said[0] == (sample.target.colour, sample.target.shape))
        elif sample.task == "caption":
            said = phrases_in(result.text)
            self.cap_pred += len(said)
            self.cap_true += len(sample.answer_objects)
            free = list(sample.answer_objects)
            for k, (c, s) in enumerate(said):
                box = dets[k].box if k < len(dets) else None
                match = next((o for o in free if (o.colour, o.shape) == (c, s) and box is not None
                              and box_iou(box, o.box) >= 0.5), None)
                if match is not None:
                    free.remove(match)
                    self.cap_tp += 1

    def summary(self) -> dict:
        out: dict = {}
        if self.rec_iou:
            iou = np.asarray(self.rec_iou)
            out["rec"] = {"acc@0.5": float((iou >= 0.5).mean()), "mean_iou": float(iou.mean()), "n": len(iou)}
            out["res"] = {"ciou": self.res_inter / max(1, self.res_union), "n": len(iou)}
        if self.pope:
            truth = np.array([t for t, _ in self.pope])
            yes = np.array([y for _, y in self.pope])
            tp, fp = int((truth & yes).sum()), int((~truth & yes).sum())
            fn = int((truth & ~yes).sum())
            prec = tp / max(1, tp + fp)
            rec = tp / max(1, tp + fn)
            out["pope"] = {"accuracy": float((truth == yes).mean()), "precision": prec, "recall": rec,
                           "f1": 2 * prec * rec / max(1e-9, prec + rec), "yes_ratio": float(yes.mean()),
                           "n": len(self.pope)}
        if self.region:
            out["region"] = {"accuracy": float(np.mean(self.region)), "n": len(self.region)}
        if self.cap_true:
            p, r = self.cap_tp / max(1, self.cap_pred), self.cap_tp / self.cap_true
            out["caption"] = {"grounded_f1": 2 * p * r / max(1e-9, p + r), "precision": p, "recall": r}
        return out


def evaluate(chat: ChatFn, *, seed: int = 1234, n_per_task: int = 500, tasks=TASKS,
             progress: bool = True) -> dict:
    """Run `chat` greedily over the held-out set; returns the metrics dict."""
    samples = make_samples(seed, n_per_task, tasks)
    scores = Scores()
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        scores.add(s, chat(s.image, s.question, s.boxes_in or None))
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(samples)):
            el = time.perf_counter() - t0
            print(f"  eval {i + 1}/{len(samples)} ({s.task}) {el:.0f} s, eta {el / (i + 1) * (len(samples) - i - 1):.0f} s",
                  file=sys.stderr, flush=True)
    out = scores.summary()
    out["meta"] = {"seed": seed, "n_per_task": n_per_task, "seconds": time.perf_counter() - t0}
    return out


def reference_chat(ckpt, *, clip_dir=None, sam_file=None, max_new_tokens: int = 48) -> ChatFn:
    from nxc.model.reference import ReferenceChat
    ref = ReferenceChat.load(ckpt, clip_dir=clip_dir, sam_file=sam_file)
    return lambda image, text, boxes: ref.chat(image, text, boxes=boxes, max_new_tokens=max_new_tokens,
                                               iou_threshold=None)


def runtime_chat(build, *, max_new_tokens: int = 48, backend: str = "onnxruntime", providers=None) -> ChatFn:
    """The same questions through the torch-free runtime on a build directory (masks unfiltered, as RES eval)."""
    from nxc.runtime.pipeline import Pipeline
    pipe = Pipeline.load(build, backend=backend, providers=providers)
    return lambda image, text, boxes: pipe.chat(image, text, boxes=boxes, max_new_tokens=max_new_tokens,
                                                iou_threshold=None)


def format_table(m: dict) -> str:
    rows = []
    if "rec" in m:
        rows += [("REC Acc@0.5", m["rec"]["acc@0.5"]), ("REC mean IoU", m["rec"]["mean_iou"]),
                 ("RES cIoU", m["res"]["ciou"])]
    if "pope" in m:
        rows += [(f"POPE {k}", m["pope"][k]) for k in ("accuracy", "precision", "recall", "f1", "yes_ratio")]
    if "region" in m:
        rows.append(("region-caption accuracy", m["region"]["accuracy"]))
    if "caption" in m:
        rows.append(("grounded-caption F1", m["caption"]["grounded_f1"]))
    width = max(len(r[0]) for r in rows) if rows else 10
    return "\n".join(f"{name:<{width}}  {value:6.3f}" for name, value in rows)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from nxc.assets import embedded_checkpoint
    ap = argparse.ArgumentParser(prog="nxc-eval", description="Grounding accuracy on the held-out shapes set.")
    ap.add_argument("target", nargs="?", help="NExT-Chat checkpoint directory, or a build directory written by "
                    "nxc-export (run through the runtime); default: the embedded model's checkpoint")
    ap.add_argument("--backend", default="onnxruntime", help="runtime backend for a build directory")
    ap.add_argument("--provider", action="append", help="ONNX Runtime provider for a build directory (cpu, cuda)")
    ap.add_argument("--clip", help="CLIP directory for a checkpoint")
    ap.add_argument("--sam", help="separate SAM weights for a checkpoint")
    ap.add_argument("--n-per-task", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", help="also write the metrics to this file")
    a = ap.parse_args(argv)
    target = Path(a.target) if a.target else embedded_checkpoint()
    if (target / "manifest.json").is_file():
        from nxc.manifest import BuildError
        from nxc.runtime.backends import BackendError
        try:
            chat = runtime_chat(target, max_new_tokens=a.max_new_tokens, backend=a.backend, providers=a.provider)
        except (BuildError, BackendError) as e:
            print(f"nxc-eval: {e}", file=sys.stderr)
            return 2
    elif (target / "config.json").is_file():
        try:
            chat = reference_chat(target, clip_dir=a.clip, sam_file=a.sam, max_new_tokens=a.max_new_tokens)
        except ImportError as e:
            print(f"nxc-eval: a checkpoint needs the export extra ({e.name} is not installed): pip install "
                  "'nxc[export]' (a build directory from nxc-export runs without it)", file=sys.stderr)
            return 2
    else:
        print(f"nxc-eval: {target} is neither a NExT-Chat checkpoint (config.json) nor a build directory "
              "(manifest.json).", file=sys.stderr)
        return 2
    metrics = evaluate(chat, seed=a.seed, n_per_task=a.n_per_task, tasks=a.tasks)
    metrics["meta"]["target"] = str(target)
    print(format_table(metrics))
    print(json.dumps(metrics, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
