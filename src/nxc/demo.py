"""`make demo`: the embedded NExT-Chat, exported and run by the torch-free runtime, answers grounding questions
on a generated image.

A build that draws (`nxc-demo --checkpoint embedded:shapes-nextgpt --build build/nextgpt`) is asked instead to draw
the scene's objects ("Draw a red circle and a blue square.") and whether the scene holds one of them; the picture
goes to --out. A build whose model answers with module calls (`--checkpoint embedded:shapes-vitron`) is asked to
segment an object and to replace it with another; the mask and the edited picture go to --out and out-1.

Exports the embedded model to build/fp32 if that build is missing (or is not a valid build), then asks a
referring question and a grounded caption through `nxc.runtime.Pipeline`, prints the replies and the boxes (with
their IoU against the drawn ground truth) and writes build/demo.png with boxes, indices and masks drawn.
`--scene-out PATH` only writes the generated scene, without annotations (an image for nxc-run, nxc-serve or the
Python API to ask about), and needs no build.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def ensure_build(build: Path, checkpoint: str | None = None) -> Path:
    from nxc.manifest import BuildError, load_manifest
    try:
        load_manifest(build)
        return build
    except BuildError as e:
        print(f"build   : {build} is not usable ({str(e).split(';')[0]}); exporting "
              f"{checkpoint or 'the embedded model'}", flush=True)
    from nxc.assets import resolve_checkpoint
    from nxc.export.exporter import ExportOptions, export_build
    return export_build(resolve_checkpoint(checkpoint) if checkpoint else None, build, options=ExportOptions())


def draw_demo(pipe, scene, out: Path, t0: float) -> int:
    """A build that draws: the scene's objects asked for as a picture (written to `out`), then one existence
    question about the scene itself."""
    from PIL import Image as PILImage

    from nxc.shapes.generator_data import caption_of
    request = f"Draw {caption_of([(o.colour, o.shape) for o in scene.objects])}."
    r = pipe.conversation(scene.image).ask(request, max_new_tokens=48)
    print(f"\nUSER      : {request}\nASSISTANT : {r.text}")
    for k, pic in enumerate(r.images):
        path = out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = pic.pixels.shape[:2]
        PILImage.fromarray(pic.pixels).resize((w * 4, h * 4), PILImage.NEAREST).save(path)
        print(f"  picture {k}: {w}x{h}, {pic.steps} {pic.scheduler} steps, guidance {pic.guidance}, seed {pic.seed}"
              f" -> {path} (4x)")
    if not r.images:
        print("  (the reply made no picture)")
    question = f"Is there a {scene.objects[0].phrase} in the image?"
    r = pipe.conversation(scene.image).ask(question, max_new_tokens=8)
    print(f"\nUSER      : {question}   (about the generated scene)\nASSISTANT : {r.text}")
    print(f"\n{time.perf_counter() - t0:.2f} s for both turns, model loading included")
    return 0


def modules_demo(pipe, scene, out: Path, t0: float) -> int:
    """A build whose model answers with module calls (embedded:shapes-vitron): a segmentation request and an edit,
    each call listed with what it made; the mask and the edited picture go to --out (and out-1)."""
    from PIL import Image as PILImage

    from nxc.runtime.draw import annotate
    from nxc.runtime.modules import calls_json
    from nxc.shapes.data import COLOURS, SHAPES
    target = scene.objects[0]
    have = {(o.colour, o.shape) for o in scene.objects}
    new = next(f"{c} {s}" for c in COLOURS for s in SHAPES if (c, s) not in have)
    written = []
    for question in (f"Segment the {target.phrase}.", f"Replace the {target.phrase} with a {new}."):
        r = pipe.conversation(scene.image).ask(question, max_new_tokens=128)
        print(f"\nUSER      : {question}\nASSISTANT : {r.raw_text}")
        for c in calls_json(r):
            made = c["error"] or f"region {c['box']}, " + (f"{len(c['pictures'])} picture(s)" if c["pictures"]
                                                           else "a mask" if c["detection"] is not None else "nothing")
            print(f"  call {c['index']}: module {c['module']} ({c['task']}, backend {c['backend']}): {made}")
        path = out if not written else out.with_name(f"{out.stem}-{len(written)}{out.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if r.images:
            px = r.images[0].pixels
            PILImage.fromarray(px).resize((px.shape[1] * 4, px.shape[0] * 4), PILImage.NEAREST).save(path)
        else:
            annotate(scene.image, [d.box for d in r.detections], [d.mask for d in r.detections]).resize(
                (scene.image.width * 3, scene.image.height * 3)).save(path)
        written.append(path)
    print(f"\nwrote {', '.join(map(str, written))} ({time.perf_counter() - t0:.2f} s, model loading included)")
    return 0


def write_scene(scene, path: Path, seed: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    scene.image.save(path)
    boxes = "; ".join(f"{o.phrase} at {[int(v) for v in o.box]}" for o in scene.objects)
    print(f"wrote {path}: the generated scene of seed {seed}, {scene.image.size[0]}x{scene.image.size[1]}, "
          f"objects (pixel xyxy): {boxes}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nxc-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=7, help="which generated scene to use")
    ap.add_argument("--build", default="build/fp32", help="build directory (exported here if missing)")
    ap.add_argument("--checkpoint", help="what to export when --build is missing, e.g. embedded:shapes-nextgpt "
                    "(default: the embedded NExT-Chat)")
    ap.add_argument("--out", default="build/demo.png", help="annotated PNG to write")
    ap.add_argument("--scene-out", metavar="PATH", help="only write the generated scene (no annotations) to PATH "
                    "and exit: an image to try nxc-run on; needs no build")
    a = ap.parse_args(argv)

    from nxc.shapes.data import make_scene

    scene = make_scene(np.random.default_rng(a.seed), max_objects=3)
    if a.scene_out:
        return write_scene(scene, Path(a.scene_out), a.seed)

    from nxc.runtime.draw import annotate
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.evaluate import box_iou

    build = ensure_build(Path(a.build), a.checkpoint)
    t = time.perf_counter()
    pipe = Pipeline.load(build)
    print(f"build   : {build} ({pipe.manifest.precision}, nxc.runtime on ONNX Runtime CPU, no torch)")
    print(f"image   : generated {scene.image.size[0]}x{scene.image.size[1]}, objects: "
          + ", ".join(o.phrase for o in scene.objects))
    if pipe.dispatch.head_of_kind("signal") is not None:
        return draw_demo(pipe, scene, Path(a.out), t)
    if pipe.manifest.modules is not None:
        return modules_demo(pipe, scene, Path(a.out), t)
    target = scene.objects[0]
    conv = pipe.conversation(scene.image)
    boxes, masks = [], []
    if pipe.config.objects is None:
        questions = (f"Where is the {target.phrase} in the image?",
                     "Can you describe the image and include object locations?")
    else:                                     # a retrieval build (nxc.model.retrieval): its own phrasing
        from nxc.shapes.retrieval_tasks import CAPTION_TEMPLATES, REC_TEMPLATES
        questions = (REC_TEMPLATES[0].replace("<expr>", f"the {target.phrase}"), CAPTION_TEMPLATES[0])
        print(f"proposals: {len(conv.state('index').objects()[0])} boxes from the proposals graph")
    for question in questions:
        r = conv.ask(question, max_new_tokens=48)
        print(f"\nUSER      : {question}\nASSISTANT : {r.text}")
        for i, det in enumerate(r.detections):
            k = len(boxes)
            best = max(scene.objects, key=lambda o: box_iou(det.box, o.box))
            kind = "mask" if det.mask is not None else "proposal"
            score = "" if det.score is None else f"  {kind} score {det.score:.2f}"
            print(f"  [{i}] box {np.round(det.box.astype(float), 1).tolist()}{score}  "
                  f"IoU with the drawn {best.phrase}: {box_iou(det.box, best.box):.2f}  (drawn as [{k}])")
            boxes.append(det.box)
            masks.append(det.mask)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    annotate(scene.image, boxes, masks).resize((scene.image.width * 3, scene.image.height * 3)).save(out)
    print(f"\nwrote {out} ({time.perf_counter() - t:.2f} s for both questions, model loading included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
