"""`make demo`: the embedded NExT-Chat answers grounding questions on a generated image.

Prints the replies, the boxes (with their IoU against the drawn ground truth) and writes
build/demo.png with boxes, indices and masks drawn.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="nxc-demo", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=7, help="which generated scene to use")
    ap.add_argument("--out", default="build/demo.png", help="annotated PNG to write")
    a = ap.parse_args(argv)

    from nxc.assets import embedded_checkpoint
    from nxc.model.reference import ReferenceChat
    from nxc.runtime.draw import annotate
    from nxc.shapes.data import make_scene
    from nxc.shapes.evaluate import box_iou

    scene = make_scene(np.random.default_rng(a.seed), max_objects=3)
    ckpt = embedded_checkpoint()
    t = time.perf_counter()
    ref = ReferenceChat.load(ckpt)
    print(f"model   : {ckpt} (PyTorch reference, CPU, fp32)")
    print(f"image   : generated {scene.image.size[0]}x{scene.image.size[1]}, objects: "
          + ", ".join(o.phrase for o in scene.objects))
    target = scene.objects[0]
    boxes, masks = [], []
    for question in (f"Where is the {target.phrase} in the image?",
                     "Can you describe the image and include object locations?"):
        r = ref.chat(scene.image, question, max_new_tokens=48)
        print(f"\nUSER      : {question}\nASSISTANT : {r.text}")
        for det in r.detections:
            k = len(boxes)
            best = max(scene.objects, key=lambda o: box_iou(det.box, o.box))
            print(f"  [{k}] box {np.round(det.box, 1).tolist()}  mask score {det.score:.2f}  "
                  f"IoU with the drawn {best.phrase}: {box_iou(det.box, best.box):.2f}")
            boxes.append(det.box)
            masks.append(det.mask)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    annotate(scene.image, boxes, masks).resize((scene.image.width * 3, scene.image.height * 3)).save(out)
    print(f"\nwrote {out} ({time.perf_counter() - t:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
