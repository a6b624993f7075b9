"""`nxc-eval`: grounding accuracy on a seeded held-out shapes set, through greedy generation.

Metrics (reference §7, on our synthetic tasks):
- REC: first detection's box vs the target box; Acc@0.5 (IoU >= 0.5) and mean IoU (no detection = 0).
- RES: the same REC queries' masks; cIoU = total intersection / total union. As in NExT-Chat's RES eval,
  a reply with other than exactly one detection counts as an empty mask; no 0.3 IoU-score filter.
- POPE: "yes" if the reply contains it; accuracy, precision, recall, F1, yes-ratio (yes = positive).
- region caption: the first colour+shape the reply names equals the region's object.
- grounded caption: F1 of (phrase, box with IoU >= 0.5) pairs against the scene's objects.
- proposal recall@0.5 (retrieval models): the share of the scenes' objects that some proposal covers with IoU >= 0.5,
  the upper bound of what answering by index can find.
- generation (`--tasks generation`, build directories that draw): "Draw ..." requests, the pictures judged by the
  shipped NExT-Chat and proposal detector (nxc.shapes.eval_generation); "n/a" for a build that does not draw.

Both grounding families answer the same held-out samples: a retrieval model (nxc.model.retrieval) is asked each
question in its own phrasing (nxc.shapes.retrieval_tasks.question), the boxes it names are scored the same way.

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
from nxc.shapes.eval_generation import ROWS as GENERATION_ROWS
from nxc.shapes.eval_generation import evaluate_generation, not_applicable
from nxc.shapes.eval_calls import ROWS as CALL_ROWS
from nxc.shapes.eval_modules import ROWS as MODULE_ROWS

MODULE_TASKS = ("grounded-generation", "editing")

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
        self.masks = False                        # a detection came with a mask (RES is reported only then)
        self.recall_hit = self.recall_total = 0   # proposal recall@0.5 (retrieval)

    def add_proposals(self, sample, proposals_px: np.ndarray) -> None:
        for o in sample.scene_objects:
            self.recall_total += 1
            self.recall_hit += any(box_iou(p, o.box) >= 0.5 for p in proposals_px)

    def add(self, sample, result) -> None:
        dets = list(result.detections)
        self.masks |= any(getattr(d, "mask", None) is not None for d in dets)
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
            if self.masks:
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
        if self.recall_total:
            out["proposals"] = {"recall@0.5": self.recall_hit / self.recall_total, "n": self.recall_total}
        return out


def evaluate(chat: ChatFn, *, seed: int = 1234, n_per_task: int = 500, tasks=TASKS,
             progress: bool = True, family: str = "regression", proposals=None) -> dict:
    """Run `chat` greedily over the held-out set; returns the metrics dict. family "retrieval": questions in the
    retrieval phrasing; `proposals(image) -> [P,4] pixel boxes` adds proposal recall@0.5 over every sample's scene."""
    from nxc.shapes.retrieval_tasks import question
    samples = make_samples(seed, n_per_task, tasks)
    scores = Scores()
    t0 = time.perf_counter()
    for i, s in enumerate(samples):
        q = question(s) if family == "retrieval" else s.question
        scores.add(s, chat(s.image, q, s.boxes_in or None))
        if proposals is not None:
            scores.add_proposals(s, proposals(s.image))
        if progress and ((i + 1) % 100 == 0 or i + 1 == len(samples)):
            el = time.perf_counter() - t0
            print(f"  eval {i + 1}/{len(samples)} ({s.task}) {el:.0f} s, eta {el / (i + 1) * (len(samples) - i - 1):.0f} s",
                  file=sys.stderr, flush=True)
    out = scores.summary()
    out["meta"] = {"seed": seed, "n_per_task": n_per_task, "seconds": time.perf_counter() - t0}
    return out


class Target:
    """What nxc-eval runs: a chat function, its grounding family and (retrieval) its proposals."""

    def __init__(self, name: str, chat: ChatFn, family: str = "regression", proposals=None, pipe=None):
        self.name, self.chat, self.family, self.proposals = name, chat, family, proposals
        self.pipe = pipe           # the runtime Pipeline of a build directory (None for a checkpoint)


def reference_chat(ckpt, *, clip_dir=None, sam_file=None, max_new_tokens: int = 48) -> Target:
    from nxc.model.nextgpt import is_nextgpt_checkpoint
    from nxc.model.retrieval import is_retrieval_checkpoint
    if is_nextgpt_checkpoint(ckpt):                 # text answers only (POPE); its pictures are judged on a build
        from types import SimpleNamespace

        from nxc.model.nextgpt_reference import NextGptReferenceChat
        ref = NextGptReferenceChat.load(ckpt, clip_dir=clip_dir)

        def chat(image, text, boxes):
            r = ref.chat(image, text, max_new_tokens=max_new_tokens)
            return SimpleNamespace(text=r.text, detections=[])
        return Target(str(ckpt), chat, "generation")
    if is_retrieval_checkpoint(ckpt):
        from nxc.model.retrieval import RetrievalReferenceChat
        from nxc.runtime.preprocess import boxes_to_pixels
        ref = RetrievalReferenceChat.load(ckpt, clip_dir=clip_dir)
        return Target(str(ckpt), lambda image, text, boxes: ref.chat(image, text, boxes=boxes,
                                                                     max_new_tokens=max_new_tokens),
                      "retrieval", lambda image: boxes_to_pixels(ref.proposals(image)[0], *image.size))
    from nxc.model.reference import ReferenceChat
    ref = ReferenceChat.load(ckpt, clip_dir=clip_dir, sam_file=sam_file)
    return Target(str(ckpt), lambda image, text, boxes: ref.chat(image, text, boxes=boxes,
                                                                 max_new_tokens=max_new_tokens, iou_threshold=None))


def runtime_chat(build, *, max_new_tokens: int = 48, backend: str = "onnxruntime", providers=None) -> Target:
    """The same questions through the torch-free runtime on a build directory (masks unfiltered, as RES eval)."""
    from nxc.runtime.pipeline import Pipeline
    from nxc.runtime.preprocess import boxes_to_pixels
    pipe = Pipeline.load(build, backend=backend, providers=providers)

    def chat(image, text, boxes):
        return pipe.chat(image, text, boxes=boxes, max_new_tokens=max_new_tokens, iou_threshold=None)
    if pipe.dispatch.head_of_kind("signal") is not None:
        return Target(str(build), chat, "generation", pipe=pipe)
    if pipe.config.objects is None:
        return Target(str(build), chat, pipe=pipe)
    return Target(str(build), chat, "retrieval",
                  lambda image: boxes_to_pixels(pipe.conversation(image).state("index").objects()[0], *image.size),
                  pipe=pipe)


ROWS = (("REC Acc@0.5", "rec", "acc@0.5"), ("REC mean IoU", "rec", "mean_iou"), ("RES cIoU", "res", "ciou"),
        ("POPE accuracy", "pope", "accuracy"), ("POPE precision", "pope", "precision"),
        ("POPE recall", "pope", "recall"), ("POPE F1", "pope", "f1"), ("POPE yes-ratio", "pope", "yes_ratio"),
        ("region-caption accuracy", "region", "accuracy"), ("grounded-caption F1", "caption", "grounded_f1"),
        ("proposal recall@0.5", "proposals", "recall@0.5"), *GENERATION_ROWS, *MODULE_ROWS, *CALL_ROWS)


def format_table(m: dict, *others: dict, names: list[str] | None = None) -> str:
    """The metrics of one run, or of several side by side (a column each; "-" where a family has no such score)."""
    runs = [m, *others]
    rows = [(label, [r.get(k, {}).get(f) for r in runs]) for label, k, f in ROWS]
    rows = [(label, vals) for label, vals in rows if any(v is not None for v in vals)]
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = []
    cell = max([6] + [len(n) for n in names or []])
    if names:
        lines.append(f"{'':<{width}}  " + "  ".join(f"{n:>{cell}}" for n in names))
    for label, vals in rows:
        lines.append(f"{label:<{width}}  " + "  ".join(f"{'-':>{cell}}" if v is None else f"{v:{cell}d}"
                                                      if isinstance(v, int) else f"{v:{cell}.3f}" for v in vals))
    lines += not_applicable(runs)
    return "\n".join(lines)


def _target(path: Path, a) -> Target:
    if (path / "manifest.json").is_file():
        return runtime_chat(path, max_new_tokens=a.max_new_tokens, backend=a.backend, providers=a.provider)
    if (path / "config.json").is_file():
        return reference_chat(path, clip_dir=a.clip, sam_file=a.sam, max_new_tokens=a.max_new_tokens)
    raise ValueError(f"{path} is neither a checkpoint (config.json) nor a build directory (manifest.json)")


def _generation(target: Target, a, judges: list) -> dict:
    """The generation task for a build (its Pipeline); a checkpoint is n/a (export it to judge its pictures)."""
    if target.pipe is None:
        return {"n/a": "generation is judged on build directories: export the checkpoint with nxc-export"}

    def shipped():
        from nxc.shapes.eval_generation import Judges
        judges[:] = judges or [Judges.shipped(backend=a.backend, providers=a.provider)]
        return judges[0]
    return evaluate_generation(target.pipe, judges[0] if judges else None, seed=a.seed, n=a.n_per_task,
                               steps=a.draw_steps, guidance=a.draw_guidance, judges_factory=shipped)


CALL_TOKENS = 128           # a module call is about 70 tokens of the shapes tokenizer


def _calls(path: Path, target: Target, a) -> dict:
    """The module-call task (nxc.shapes.eval_calls), replies up to CALL_TOKENS tokens long."""
    from nxc.shapes.eval_calls import evaluate_calls
    if target.family != "regression":
        return {"n/a": "module calls are scored on a grounding (NExT-Chat-family) model"}
    if target.pipe is not None:
        pipe = target.pipe

        def chat(image, text, boxes):
            return pipe.chat(image, text, boxes=boxes, max_new_tokens=max(CALL_TOKENS, a.max_new_tokens),
                             iou_threshold=None)
    else:
        chat = reference_chat(path, clip_dir=a.clip, sam_file=a.sam,
                              max_new_tokens=max(CALL_TOKENS, a.max_new_tokens)).chat
    return evaluate_calls(chat, seed=a.seed, n=a.n_per_task, pipe=target.pipe)


def _modules(target: Target, a, judges: list) -> dict:
    """The grounded-generation and editing tasks for a build (nxc.shapes.eval_modules)."""
    from nxc.shapes.eval_modules import NOT_GROUNDED, evaluate_grounded, grounded
    keys = [t.replace("-", "_") for t in MODULE_TASKS if t in a.tasks]
    if target.pipe is None or not grounded(target.pipe):
        reason = ("these tasks are judged on build directories: export the checkpoint with nxc-export"
                  if target.pipe is None else NOT_GROUNDED)
        return {k: {"n/a": reason} for k in keys}
    from nxc.shapes.eval_generation import Judges
    judges[:] = judges or [Judges.shipped(backend=a.backend, providers=a.provider)]
    out = evaluate_grounded(target.pipe, judges[0].nextchat, seed=a.seed, n=a.n_per_task)
    return {k: out[k] for k in keys}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from nxc.assets import embedded_checkpoint, resolve_checkpoint
    ap = argparse.ArgumentParser(prog="nxc-eval", description="Grounding accuracy on the held-out shapes set; "
                                 "several targets are scored on the same samples and shown side by side.")
    ap.add_argument("targets", nargs="*", help="checkpoint directories (NExT-Chat, retrieval or NExT-GPT), "
                    "embedded:NAME (a shipped checkpoint, e.g. embedded:shapes-nextgpt), or build directories written "
                    "by nxc-export (run through the runtime); default: the embedded NExT-Chat")
    ap.add_argument("--backend", default="onnxruntime", help="runtime backend for a build directory")
    ap.add_argument("--provider", action="append", help="ONNX Runtime provider for a build directory (cpu, cuda)")
    ap.add_argument("--clip", help="CLIP directory for a checkpoint")
    ap.add_argument("--sam", help="separate SAM weights for a checkpoint")
    ap.add_argument("--n-per-task", type=int, default=500)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--tasks", nargs="+", choices=(*TASKS, "generation", *MODULE_TASKS, "modules"),
                    default=list(TASKS),
                    help="grounding tasks, 'generation' (pictures a build draws, judged by the shipped models), "
                    "'grounded-generation' and 'editing' (a GLIGEN generator's boxes and edits, judged by the "
                    "shipped NExT-Chat), 'modules' (VITRON-style module calls: module choice, regions, masks, "
                    "tracks)")
    ap.add_argument("--draw-steps", type=int, help="generation: denoising steps per picture (default: the build's)")
    ap.add_argument("--draw-guidance", type=float, help="generation: classifier-free guidance (default: the build's)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", help="also write the metrics to this file")
    a = ap.parse_args(argv)
    try:
        paths = [resolve_checkpoint(t) for t in a.targets] or [embedded_checkpoint()]
    except FileNotFoundError as e:
        print(f"nxc-eval: {e}", file=sys.stderr)
        return 2
    runs, judges = [], []          # the generation judges, exported once for the run when a build draws
    for path in paths:
        from nxc.manifest import BuildError
        from nxc.runtime.backends import BackendError
        try:
            target = _target(path, a)
        except (BuildError, BackendError, ValueError) as e:
            print(f"nxc-eval: {e}", file=sys.stderr)
            return 2
        except ImportError as e:
            print(f"nxc-eval: a checkpoint needs the export extra ({e.name} is not installed): pip install "
                  "'nxc[export]' (a build directory from nxc-export runs without it)", file=sys.stderr)
            return 2
        print(f"[nxc-eval] {path} ({target.family})", file=sys.stderr, flush=True)
        grounding = [t for t in a.tasks if t in TASKS]
        if target.family == "generation" and set(grounding) - {"pope"}:       # it answers, but never grounds
            print(f"[nxc-eval] {path}: a NExT-GPT model has no boxes or masks: of "
                  f"{', '.join(grounding)} only pope is scored", file=sys.stderr)
            grounding = [t for t in grounding if t == "pope"]
        metrics = evaluate(target.chat, seed=a.seed, n_per_task=a.n_per_task, tasks=grounding, family=target.family,
                           proposals=target.proposals) if grounding else {"meta": {"seed": a.seed}}
        metrics["meta"].update(target=str(path), family=target.family)
        if "generation" in a.tasks:
            metrics["generation"] = _generation(target, a, judges)
        if set(MODULE_TASKS) & set(a.tasks):
            metrics.update(_modules(target, a, judges))
        if "modules" in a.tasks:
            metrics["modules"] = _calls(path, target, a)
        runs.append(metrics)
    if len(runs) == 1:
        print(format_table(runs[0]))
    else:
        print(format_table(*runs, names=[f"{r['meta']['family']}: {Path(r['meta']['target']).name}" for r in runs]))
    out = runs[0] if len(runs) == 1 else {"runs": runs}
    print(json.dumps(out, indent=2))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
