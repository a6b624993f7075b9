"""`make demo`: the reference NExT-Chat answering a grounding question on a generated image.

Until the embedded shapes model ships, this runs a tiny random-weight checkpoint (made on the fly
into build/tiny-nextchat): the answer is noise, but every stage of the reference runs.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw


def demo_image() -> Image.Image:
    img = Image.new("RGB", (320, 200), (235, 235, 225))
    d = ImageDraw.Draw(img)
    d.ellipse((40, 50, 130, 140), fill=(220, 30, 30))
    d.rectangle((190, 60, 280, 170), fill=(30, 60, 220))
    return img


def main(argv: list[str] | None = None) -> int:
    from nxc.model.reference import ReferenceChat
    from nxc.model.writer import make_tiny_checkpoint

    ckpt = Path("build/tiny-nextchat")
    if not (ckpt / "config.json").is_file():
        print(f"making a tiny random NExT-Chat checkpoint in {ckpt} ...", flush=True)
        make_tiny_checkpoint(ckpt, seed=0)
    t = time.perf_counter()
    ref = ReferenceChat.load(ckpt)
    question = "Where is the red circle in the image?"
    result = ref.chat(demo_image(), question, max_new_tokens=24)
    print(f"checkpoint : {ckpt} (tiny, random weights: the reply is not meaningful yet)")
    print(f"question   : {question}")
    print(f"reply      : {result.text!r}")
    print(f"token ids  : {result.token_ids} ({result.finish_reason})")
    print(f"detections : {len(result.detections)}")
    for k, det in enumerate(result.detections):
        print(f"  [{k}] box {det.box.round(1).tolist()} score {det.score:.3f} mask pixels {int(det.mask.sum())}")
    print(f"took {time.perf_counter() - t:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
