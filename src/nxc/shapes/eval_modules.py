"""`nxc-eval --tasks grounded-generation editing`: a GLIGEN generator's boxes and edits, judged by the kit's own
NExT-Chat (issue 29, item 5).

    grounded generation: a seeded request of 1-3 (colour, shape) objects, each with the box it has in a true scene of
      them (nxc.shapes.generator_data.grounded_picture_of: placed as the training scenes are)
        ─▶ the build's generator through the runtime (Generator.draw: the caption's conditioning, each phrase
           grounded in its box) ─▶ NExT-Chat, per object: "Where is the red circle in the image?" ─▶ its box
        found: IoU >= 0.5 with the requested box (the right colour and shape at the right place)
    editing: a true scene of 1-3 objects; one object, at random, is to become another (colour, shape) absent from
      the scene, in its box ─▶ Generator.draw(source = the scene, grounding = the new phrase in the box)
        correct: NExT-Chat finds the new object at the box (IoU >= 0.5); preserved: PSNR of the pixels outside the
        box (beyond the latent cells the box touches) against the source, >= 30 dB

Metrics (JSON keys "grounded_generation", "editing"): box_recall (objects found at their box / objects asked),
mean_iou, seconds_per_picture (median, the generator's stages); editing: edit_accuracy (edits found at their box),
psnr_outside (mean dB), preserved (edits with PSNR outside >= 30 dB), both (correct and preserved). ceiling_*:
the same judge on the TRUE pictures (a perfect generator's score under this judge).

The requests go to the generator directly, not through a reply: the LLM choosing the module and writing the call
is scored apart (module choice). "n/a" for a build whose generator is not GLIGEN's.
"""
from __future__ import annotations

import sys
import time

import numpy as np

from nxc.shapes.data import COLOURS, SHAPES
from nxc.shapes.generator_data import caption_of, grounded_picture_of

NOT_GROUNDED = "n/a: this build's generator is not GLIGEN's (no grounded generation or editing)"
PSNR_OK = 30.0
ROWS = (("grounded gen: objects at their box", "grounded_generation", "box_recall"),
        ("grounded gen: mean IoU", "grounded_generation", "mean_iou"),
        ("grounded gen: s / picture (median)", "grounded_generation", "seconds_per_picture"),
        ("  judge on true pictures", "grounded_generation", "ceiling_box_recall"),
        ("editing: new object at its box", "editing", "edit_accuracy"),
        ("editing: PSNR outside the box (dB)", "editing", "psnr_outside"),
        ("editing: PSNR >= 30 dB", "editing", "preserved"),
        ("editing: both", "editing", "both"),
        ("  judge on true pictures", "editing", "ceiling_edit_accuracy"))


def grounded(pipe) -> bool:
    g = pipe.manifest.generator
    return g is not None and g.sizes.grounded and g.text_encoder is not None


def _kinds(rng, k: int, exclude=()) -> list[tuple[str, str]]:
    colours = list(COLOURS)
    pool = [(c, s) for c in colours for s in SHAPES if (c, s) not in exclude]
    return [pool[i] for i in rng.choice(len(pool), size=k, replace=False)]


def locate(nextchat, picture: np.ndarray, colour: str, shape: str) -> np.ndarray | None:
    """NExT-Chat's box for "Where is the <colour> <shape> in the image?" as fractions of the picture's sides, or
    None. The picture is upscaled to >= 64 px first, as nxc-eval's generation task shows it (for_judging)."""
    from nxc.shapes.eval_generation import for_judging
    img = for_judging(picture)
    reply = nextchat.chat(img, f"Where is the {colour} {shape} in the image?", max_new_tokens=24)
    w, h = img.size
    return reply.detections[0].box / np.asarray([w, h, w, h], np.float32) if reply.detections else None


def _iou_at(nextchat, picture, phrase, box01) -> float:
    from nxc.shapes.evaluate import box_iou
    got = locate(nextchat, picture, *phrase)
    return 0.0 if got is None else box_iou(got, box01)


def psnr_outside(edited: np.ndarray, source: np.ndarray, box01, latent_side: int) -> float:
    """PSNR (dB) of the pixels outside the box, the latent cells it touches (the inpainting mask) widened by one
    cell, against the source."""
    side = source.shape[0]
    cell = side / latent_side
    x0, y0, x1, y1 = np.asarray(box01, np.float64) * latent_side
    keep = np.ones(source.shape[:2], bool)
    keep[max(0, int((int(y0) - 1) * cell)):int((np.ceil(y1) + 1) * cell),
         max(0, int((int(x0) - 1) * cell)):int((np.ceil(x1) + 1) * cell)] = False
    err = ((edited[keep].astype(np.float64) - source[keep].astype(np.float64)) ** 2).mean()
    return float("inf") if err == 0 else float(10 * np.log10(255 ** 2 / err))


def evaluate_grounded(pipe, nextchat, *, seed: int = 1234, n: int = 100, progress: bool = True) -> dict:
    """{"grounded_generation": ..., "editing": ...} for one build (n requests each)."""
    if not grounded(pipe):
        return {"grounded_generation": {"n/a": NOT_GROUNDED}, "editing": {"n/a": NOT_GROUNDED}}
    from nxc.runtime.generator import DrawOptions, Generator
    from nxc.runtime.timing import Timeline
    gen = Generator.from_pipeline(pipe)
    s = gen.entry.sizes
    side = s.image_height
    stages = {gen.entry.denoiser, gen.entry.decoder, gen.entry.text_encoder, gen.entry.encoder}
    rng = np.random.default_rng([seed, 29])
    g_iou, g_true, e_iou, e_true, psnr, secs = [], [], [], [], [], []
    t0 = time.perf_counter()
    for i in range(n):
        objects = _kinds(rng, int(rng.integers(1, 4)))
        truth, boxes = grounded_picture_of(rng, objects, side=side)
        phrases = [caption_of([o]) for o in objects]
        tl = Timeline()
        cond = gen.text_conditioning(caption_of(objects), timeline=tl)
        pixels, _ = gen.draw(cond, DrawOptions(seed=seed + i), grounding=(phrases, boxes), timeline=tl)
        secs.append(sum(e.seconds for e in tl.events if e.stage in stages))
        for o, b in zip(objects, boxes):
            g_iou.append(_iou_at(nextchat, pixels, o, b))
            g_true.append(_iou_at(nextchat, truth, o, b))
        k = int(rng.integers(len(objects)))
        new = _kinds(rng, 1, exclude=objects)[0]
        cond = gen.text_conditioning(caption_of([new]))
        edited, _ = gen.draw(cond, DrawOptions(seed=seed + i), grounding=([caption_of([new])], boxes[k:k + 1]),
                             source=truth)
        e_iou.append(_iou_at(nextchat, edited, new, boxes[k]))
        e_true.append(g_true[-len(objects) + k])        # the judge on the true object in that box
        psnr.append(psnr_outside(edited, truth, boxes[k], s.latent_height))
        if progress and ((i + 1) % 20 == 0 or i + 1 == n):
            el = time.perf_counter() - t0
            print(f"  grounded generation + editing {i + 1}/{n} {el:.0f} s, eta {el / (i + 1) * (n - i - 1):.0f} s",
                  file=sys.stderr, flush=True)
    g_iou, g_true, e_iou = np.asarray(g_iou), np.asarray(g_true), np.asarray(e_iou)
    p = np.asarray(psnr)
    finite = np.minimum(p, 100.0)
    return {
        "grounded_generation": {"box_recall": float((g_iou >= 0.5).mean()), "mean_iou": float(g_iou.mean()),
                                "seconds_per_picture": float(np.median(secs)), "objects": int(g_iou.size), "n": n,
                                "ceiling_box_recall": float((g_true >= 0.5).mean())},
        "editing": {"edit_accuracy": float((e_iou >= 0.5).mean()), "psnr_outside": float(finite.mean()),
                    "preserved": float((p >= PSNR_OK).mean()), "both": float(((e_iou >= 0.5) & (p >= PSNR_OK)).mean()),
                    "n": n, "ceiling_edit_accuracy": float((np.asarray(e_true) >= 0.5).mean())},
        "meta": {"seed": seed, "seconds": time.perf_counter() - t0, "judge": str(nextchat.manifest.root)}}
