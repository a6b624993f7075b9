"""The runtime's answers to a fixed set of prompts, as JSON, for `make test-aarch64`: run once on x86 and once under
aarch64 emulation over the same builds, then compared (tests/aarch64/harness.py). Runtime only: numpy, Pillow,
onnxruntime, tokenizers (no torch, no pytest).

    python tests/aarch64/answers.py BUILDS_DIR OUT.json     # BUILDS_DIR holds embedded/ and retrieval/
"""
from __future__ import annotations

import base64
import io
import json
import sys
import time
from pathlib import Path

import numpy as np

from nxc.runtime.pipeline import Pipeline
from nxc.shapes.data import make_sample, make_scene
from nxc.shapes.retrieval_tasks import CAPTION_TEMPLATES, REC_TEMPLATES

MAX_NEW_TOKENS = 48
PLAIN = ["What color is the background?", "How many objects are there?", "Describe the image."]


def embedded_prompts(seed: int = 11, n_per_task: int = 2) -> list[tuple]:
    """(image, question, boxes): the NExT-Chat model's four tasks and plain questions on generated scenes."""
    rng = np.random.default_rng(seed)
    out = []
    for task in ("rec", "caption", "region", "pope"):
        for _ in range(n_per_task):
            s = make_sample(rng, task, make_scene(rng))
            out.append((s.image, s.question, s.boxes_in or None))
    out += [(make_scene(rng).image, q, None) for q in PLAIN]
    return out


def retrieval_prompts(seed: int = 42) -> list[tuple]:
    """The retrieval model asked in its own phrasing (tests/runtime/test_retrieval.py's prompts, one scene)."""
    sc = make_scene(np.random.default_rng(seed))
    o = sc.objects[0]
    return [(sc.image, REC_TEMPLATES[0].replace("<expr>", f"the {o.phrase}"), None),
            (sc.image, CAPTION_TEMPLATES[0], None),
            (sc.image, f"Is there a {o.phrase} in the image?", None),
            (sc.image, "What is region [0]?", [o.box])]


def png(image) -> str:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def record(r) -> dict:
    """A ChatResult as JSON: ids, text, and per detection its boxes, score and mask (packed bits)."""
    dets = []
    for d in r.detections:
        det = {"phrase": d.phrase, "box": [float(v) for v in d.box],
               "box_norm": [float(v) for v in d.box_norm] if d.box_norm is not None else None,
               "score": None if d.score is None else float(d.score), "mask": None}
        if d.mask is not None:
            det["mask"] = {"shape": list(d.mask.shape),
                           "bits": base64.b64encode(np.packbits(d.mask.astype(bool))).decode()}
        dets.append(det)
    return {"prompt_ids": list(r.prompt_ids), "token_ids": list(r.token_ids), "text": r.text,
            "finish_reason": r.finish_reason, "detections": dets}


def answers(builds: Path) -> dict:
    out = {}
    for name, prompts in (("embedded", embedded_prompts()), ("retrieval", retrieval_prompts())):
        pipe = Pipeline.load(builds / name)
        rows = []
        for k, (image, question, boxes) in enumerate(prompts):
            t0 = time.perf_counter()
            r = pipe.chat(image, question, boxes=boxes, max_new_tokens=MAX_NEW_TOKENS)
            rows.append({"question": question, "boxes": boxes, "image_png": png(image), **record(r),
                         "seconds": round(time.perf_counter() - t0, 3)})
            print(f"[answers] {name} {k + 1}/{len(prompts)}: {len(r.token_ids)} tokens, "
                  f"{len(r.detections)} detection(s), {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
        out[name] = rows
    return out


def main(argv: list[str]) -> int:
    builds, dest = Path(argv[0]), Path(argv[1])
    data = answers(builds)
    tmp = dest.with_name(dest.name + ".partial")
    tmp.write_text(json.dumps(data))
    tmp.replace(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
