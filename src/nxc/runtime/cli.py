"""nxc-run: ask a build directory a question about an image; prints the reply and its detections."""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from PIL import Image

from nxc.manifest import BuildError
from nxc.runtime.backends import BACKENDS, BackendError
from nxc.runtime.images import ImageError, blank_image, load_image
from nxc.runtime.modules import calls_json
from nxc.prompt import PromptError


def _box(text: str) -> list[float]:
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box expects x1,y1,x2,y2 in pixels, got {text!r}") from None
    if len(vals) != 4:
        raise argparse.ArgumentTypeError(f"--box expects 4 numbers x1,y1,x2,y2, got {len(vals)} in {text!r}")
    return vals


def _utf8(text: str) -> str:
    """argv decodes bytes that are not UTF-8 to lone surrogates (PEP 383); refuse them here, not in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"lone surrogate U+{c:04X}"
        raise argparse.ArgumentTypeError(f"is not valid UTF-8 ({what} at character {e.start}); pass the question as "
                                         "UTF-8 text") from None
    return text


def _whole(least: int):
    """An int type for argparse that refuses '1.5', 'inf' and anything below `least` in one line."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < least:
            raise argparse.ArgumentTypeError(f"expects a whole number >= {least}, got {text!r}")
        return value
    return parse


def _number(least: float, most: float | None = None, *, above: bool = False):
    """A float type for argparse: finite, >= `least` (> with `above`) and <= `most`."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        low = value <= least if above else value < least
        if not math.isfinite(value) or low or (most is not None and value > most):
            span = f"{'>' if above else '>='} {least:g}" + (f" and <= {most:g}" if most is not None else "")
            raise argparse.ArgumentTypeError(f"expects a finite number {span}, got {text!r}")
        return value
    return parse


def _out(text: str) -> str:
    """--out is checked before the model runs: Pillow takes the format from the extension."""
    p = Path(text)
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; name the image file to write, e.g. "
                                         f"{p / 'annotated.png'}")
    if not p.suffix:
        raise argparse.ArgumentTypeError(f"{text} has no extension, and Pillow takes the image format from it; end "
                                         "the name with .png or .jpg")
    if Image.registered_extensions().get(p.suffix.lower()) not in Image.SAVE:
        raise argparse.ArgumentTypeError(f"{text}: Pillow cannot write {p.suffix} images; end the name with .png or "
                                         ".jpg")
    parent = next(q for q in p.absolute().parents if q.exists())
    if not parent.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a directory")
    return text


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nxc-run", description=__doc__.split("\n")[0],
                                 epilog='example: nxc-run build/fp32 --image photo.png --prompt "Where is the red '
                                        'circle?" --out annotated.png')
    ap.add_argument("build", help="build directory written by nxc-export")
    ap.add_argument("--image", help="image file (PNG, JPEG, ...); /dev/stdin reads a pipe. Optional for a build "
                    "that draws from the text (NExT-GPT): a plain 64 x 64 grey picture then")
    ap.add_argument("--video", help="a video instead of --image (GIF, animated PNG / WebP; MP4, WebM, MOV with "
                    "nxc[video]): up to --frames frames sampled evenly, their image rows averaged (VITRON's video "
                    "input); the first frame is the image for boxes and masks, a track call follows every frame")
    ap.add_argument("--frames", type=_whole(1), default=8, help="--video: frames sampled (default 8)")
    ap.add_argument("--prompt", required=True, type=_utf8, help="question; refer to --box k as [k]")
    ap.add_argument("--box", type=_box, action="append", metavar="x1,y1,x2,y2",
                    help="region input in pixels (repeat for [0], [1], ...)")
    ap.add_argument("--out", type=_out, help="write the image with boxes, indices and masks drawn (.png, .jpg); for a "
                                             "build that draws, the picture(s) the reply made (pic.png, pic-1.png, ...)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    ap.add_argument("--max-new-tokens", type=_whole(1), help="default: the build's (512)")
    ap.add_argument("--temperature", type=_number(0), default=0.0, help="0 = greedy (default)")
    ap.add_argument("--top-p", type=_number(0, 1, above=True), default=1.0, help="in (0, 1]; 1 = off (default)")
    ap.add_argument("--top-k", type=_whole(0), default=0, help="0 = off (default)")
    ap.add_argument("--seed", type=_whole(0), help="sampling seed; also the picture's (a build that draws; default 0)")
    ap.add_argument("--steps", type=_whole(1), help="a build that draws: denoising steps (default: the build's)")
    ap.add_argument("--guidance", type=_number(0), help="a build that draws: classifier-free guidance (default: the "
                                                        "build's; <= 1: none)")
    ap.add_argument("--scheduler", choices=("ddim", "euler", "lcm"),
                    help="a build that draws: the sampler (default: the build's)")
    ap.add_argument("--num-beams", type=_whole(1), default=1,
                    help="beam search with this many beams (greedy; NExT-Chat's demo used 5); 1 = off (default)")
    ap.add_argument("--length-penalty", type=_number(-1e6), default=1.0,
                    help="with --num-beams: finished beams score sum(log p) / length ** this (default 1)")
    ap.add_argument("--early-stopping", choices=("false", "true", "never"), default="false",
                    help="with --num-beams, Hugging Face's meanings (default false)")
    ap.add_argument("--backend", choices=BACKENDS, default="onnxruntime")
    ap.add_argument("--low-memory", action="store_true",
                    help="unload the vision and SAM encoder sessions after their one run and give back the KV cache "
                         "before SAM runs (a smaller peak next to a large llm; each image loads them again)")
    ap.add_argument("--provider", action="append", help="ONNX Runtime provider: cpu, cuda, tensorrt (repeatable)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from nxc.runtime.pipeline import Pipeline
    try:
        if a.image is not None and a.video is not None:
            raise ValueError("--image and --video: give one of them")
        image = load_image(a.image) if a.image is not None else None
        video = None
        if a.video is not None:
            from nxc.runtime.video import load_video
            video = load_video(a.video, max_frames=a.frames)
            image = video.frames[0]
        pipe = Pipeline.load(a.build, backend=a.backend, providers=a.provider, low_memory=a.low_memory)
        draws = pipe.dispatch.head_of_kind("signal") is not None
        if image is None and not draws:
            raise ValueError(f"--image is required: {a.build} answers about an image (only a build that draws from "
                             "the text, such as NExT-GPT, runs without one)")
        image = image if image is not None else blank_image()
        if not draws and any(v is not None for v in (a.steps, a.guidance, a.scheduler)):
            raise ValueError(f"{a.build} does not draw (no signal head): --steps, --guidance and --scheduler are for "
                             "a build that makes pictures")
        options = {"signal": {"steps": a.steps, "guidance": a.guidance, "seed": a.seed or 0,
                              "scheduler": a.scheduler}} if draws else None
        r = pipe.chat(video or image, a.prompt, boxes=a.box, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                      top_p=a.top_p, top_k=a.top_k, seed=a.seed, num_beams=a.num_beams,
                      length_penalty=a.length_penalty, head_options=options,
                      early_stopping={"false": False, "true": True}.get(a.early_stopping, a.early_stopping))
    except (ImageError, BuildError, BackendError, PromptError, ValueError) as e:
        print(f"nxc-run: {e}", file=sys.stderr)
        return 2
    if a.out:
        from nxc.runtime.draw import annotate
        try:
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            if r.images:
                written = _write_pictures(r.images, Path(a.out))
            else:
                annotate(image, [d.box for d in r.detections], [d.mask for d in r.detections]).save(a.out)
                written = [a.out]
        except (OSError, ValueError, KeyError) as e:          # Pillow: no writer for this mode, disk full, ...
            print(f"nxc-run: cannot write {a.out} ({getattr(e, 'strerror', None) or e})", file=sys.stderr)
            return 2
    if a.json:
        print(json.dumps({"text": r.text, "raw_text": r.raw_text, "token_ids": r.token_ids,
                          "finish_reason": r.finish_reason,
                          "detections": [{"box": [round(float(v), 2) for v in d.box], "phrase": d.phrase,
                                          "score": d.score, "mask_pixels": int(d.mask.sum()) if d.mask is not None else 0}
                                         for d in r.detections], "annotated": a.out if a.out and not r.images else None,
                          "calls": calls_json(r),
                          "pictures": [{"file": str(f) if a.out else None, "seed": im.seed, "steps": im.steps,
                                        "guidance": im.guidance, "scheduler": im.scheduler}
                                       for f, im in zip(written if a.out else [None] * len(r.images), r.images)]},
                         indent=2))
        return 0
    print(r.text)
    if r.detections:
        print(f"\n{'k':>3}  {'box (x1, y1, x2, y2)':<34} {'score':>6} {'mask px':>8}  phrase")
        for k, d in enumerate(r.detections):
            box = ", ".join(f"{v:.1f}" for v in d.box)
            score = "-" if d.score is None else f"{d.score:.2f}"
            mask = "-" if d.mask is None else str(int(d.mask.sum()))
            print(f"{k:>3}  {box:<34} {score:>6} {mask:>8}  {d.phrase}")
    for c in calls_json(r):
        print(_call_line(c))
    for im in r.images:
        print(f"picture {im.index}: {im.pixels.shape[1]}x{im.pixels.shape[0]}, seed {im.seed}, {im.steps} "
              f"{im.scheduler} steps, guidance {im.guidance:g}")
    if a.out:
        print(f"\nwrote {', '.join(map(str, written))}")
    return 0


def _call_line(c: dict) -> str:
    """"call 0: module B (image segmentation) -> detection 0" or "call 1: not run: <why>" (c: a calls_json entry)."""
    if c["error"] is not None:
        return f"call {c['index']}: not run: {c['error']}"
    made = ([] if c["detection"] is None else [f"detection {c['detection']}"]) + [f"picture {k}" for k in c["pictures"]]
    if len(c["track"]) > 1:
        made.append(f"a track over {len(c['track'])} frames")
    return f"call {c['index']}: module {c['module']} ({c['task']}) -> {', '.join(made) or 'nothing'}"


def _write_pictures(images, out: Path) -> list[Path]:
    """The reply's pictures: the first to `out`, the next to out-1.png, out-2.png, ..."""
    files = [out if k == 0 else out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(len(images))]
    for f, im in zip(files, images):
        im.to_pil().save(f)
    return files


if __name__ == "__main__":
    sys.exit(main())
