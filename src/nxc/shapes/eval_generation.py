"""`nxc-eval --tasks generation`: pictures a build draws, judged by the kit's own perception models (issue 28, 6).

    "Draw a red circle and a blue square."  (seeded held-out request, the generator's caption phrasing)
        ─▶ build under test (runtime) ─▶ Image events (none: every requested object missed)
        ─▶ each picture, upscaled to >= 64 px ─┬▶ shipped NExT-Chat build: "Is there a red circle in the image?"
                                               │   for each requested object (recall) and for near-miss absent
                                               │   ones (same shape other colour, same colour other shape)
                                               └▶ shipped retrieval build's proposal detector: filtered proposals
                                                   == requested count (count accuracy)

Metrics per build (JSON key "generation"):
- recall: requested objects judged present, over all requested objects (a request without a picture misses all).
- precision: near-miss absent objects judged absent (nothing drawn that was not asked for), over the pictures made.
- count_accuracy: pictures whose detector count equals the requested count (a request without a picture: wrong).
- seconds_per_picture: median over pictures of the drawing stages of the turn (the signal head's projector, every
  denoiser step, the latent decoder) from the runtime's Timeline: the turn minus its text.
- drawn: requests whose reply made a picture; n: requests; pictures: pictures judged.
- ceiling_recall, ceiling_precision, ceiling_count_accuracy: the same judges on the requests' TRUE pictures (each
  request's objects placed and painted as the generator's training scenes, nxc.shapes.generator_data.picture_of, at
  the build's picture size): what a perfect generator would score. The judges are models, not ground truth; on the
  shipped judges at 64 px (seed 1234, 200 requests) that is recall 0.952, precision 0.843, count 1.000: NExT-Chat says
  yes to some near misses in true pictures (a red square asked about beside a red circle), so a precision of 0.85
  is the judges' limit, not the generator's.

A build without a generator is "n/a: this build does not draw". Pictures smaller than the judges' smallest training
scenes (64 px a side: nxc.shapes.data.MIN_SIDE; the tiny random generators draw 16 x 16) are upscaled bilinearly
to 64 px before judging; the shapes generator's 64 x 64 pictures are judged as drawn. The draw request is asked about
a plain light-grey 64 x 64 image (the runtime's turns carry an image; NExT-GPT draws from the text).

The judges are the shipped checkpoints (nxc.assets) exported fp32 once and cached under the temp dir, keyed by the
checkpoints' files, as tests/conftest.py exports them; or any two builds given to Judges.load.
"""
from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nxc.shapes.data import COLOURS, MIN_SIDE, POPE_TEMPLATES, SHAPES
from nxc.shapes.generator_data import caption_of, picture_of

Phrase = tuple[str, str]       # (colour, shape)
NOT_DRAWING = "n/a: this build does not draw"
ROWS = (("generation object recall", "generation", "recall"), ("generation precision", "generation", "precision"),
        ("generation count accuracy", "generation", "count_accuracy"),
        ("generation s / picture (median)", "generation", "seconds_per_picture"),
        ("generation requests", "generation", "n"),
        ("  judges on true pictures: recall", "generation", "ceiling_recall"),
        ("  judges on true pictures: precision", "generation", "ceiling_precision"),
        ("  judges on true pictures: count", "generation", "ceiling_count_accuracy"))


@dataclass(frozen=True)
class DrawRequest:
    """One held-out drawing request: 1-3 distinct (colour, shape) objects, its text and the near misses to ask
    about (each absent from the request: per object one of its shape in another colour, one of its colour in
    another shape, distinct)."""
    objects: tuple[Phrase, ...]
    near_misses: tuple[Phrase, ...]

    @property
    def text(self) -> str:
        """"Draw a red circle and a blue square." (generator_data.caption_of's phrasing)."""
        return f"Draw {caption_of(list(self.objects))}."


def make_requests(seed: int, n: int, *, max_objects: int = 3) -> list[DrawRequest]:
    """n seeded requests (the same seed, the same list), 1..max_objects objects each."""
    if not 1 <= max_objects <= len(COLOURS) * len(SHAPES):
        raise ValueError(f"max_objects must be 1..{len(COLOURS) * len(SHAPES)}, got {max_objects}")
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_objects + 1))
        kinds = rng.choice(len(colours) * len(SHAPES), size=k, replace=False)
        objects = tuple((colours[i // len(SHAPES)], SHAPES[i % len(SHAPES)]) for i in kinds)
        misses: list[Phrase] = []
        for c, s in objects:
            for cand in ([(o, s) for o in colours if o != c], [(c, o) for o in SHAPES if o != s]):
                free = [p for p in cand if p not in objects and p not in misses]
                if free:
                    misses.append(free[int(rng.integers(len(free)))])
        out.append(DrawRequest(objects=objects, near_misses=tuple(misses)))
    return out


def existence_question(colour: str, shape: str) -> str:
    """The kit's POPE phrasing (nxc.shapes.data.POPE_TEMPLATES[0]): "Is there a red circle in the image?"."""
    return POPE_TEMPLATES[0].replace("<obj>", f"a {colour} {shape}")


def for_judging(pixels: np.ndarray) -> Image.Image:
    """[H,W,3] uint8 -> PIL RGB, upscaled bilinearly (aspect kept) so its shorter side is >= MIN_SIDE (64)."""
    img = Image.fromarray(np.asarray(pixels, np.uint8), "RGB")
    short = min(img.size)
    if short < MIN_SIDE:
        scale = MIN_SIDE / short
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    return img


class Judges:
    """The kit's perception models through the runtime. nextchat: a NExT-Chat build (existence questions);
    detector: a retrieval build (its proposals graph + the build's filter, as `conv.state("index").objects()`)."""

    def __init__(self, *, nextchat, detector):
        if detector.config.objects is None:
            raise ValueError(f"{detector.manifest.root}: the counting judge must be a retrieval build (a proposals "
                             "graph); this one has none: export nxc.assets.retrieval_checkpoint()")
        self.nextchat, self.detector = nextchat, detector

    @classmethod
    def load(cls, nextchat_build, detector_build, *, backend: str = "onnxruntime", providers=None) -> "Judges":
        from nxc.runtime.pipeline import Pipeline
        return cls(nextchat=Pipeline.load(nextchat_build, backend=backend, providers=providers),
                   detector=Pipeline.load(detector_build, backend=backend, providers=providers))

    @classmethod
    def shipped(cls, cache: str | Path | None = None, **kwargs) -> "Judges":
        """The shipped NExT-Chat and retrieval models, exported fp32 into `cache` (default: the temp dir) unless an
        export of the same checkpoint files is there already."""
        from nxc.assets import embedded_checkpoint, retrieval_checkpoint
        root = Path(cache) if cache is not None else Path(tempfile.gettempdir()) / "nxc-eval-judges"
        return cls.load(shipped_build(embedded_checkpoint(), root), shipped_build(retrieval_checkpoint(), root),
                        **kwargs)

    def present(self, picture: Image.Image, colour: str, shape: str) -> bool:
        """NExT-Chat's greedy answer to the existence question contains "yes" (as nxc-eval scores POPE)."""
        reply = self.nextchat.chat(picture, existence_question(colour, shape), max_new_tokens=8)
        return "yes" in reply.text.lower()

    def count(self, picture: Image.Image) -> int:
        """The detector's filtered proposals on the picture."""
        return int(len(self.detector.conversation(picture).state("index").objects()[0]))


def shipped_build(checkpoint: Path, root: Path) -> Path:
    """`checkpoint` exported fp32 under root/<name>-<hash of its files' names, sizes and mtimes>; reused when its
    manifest is there, otherwise written next to it and moved in place (a half-written export is never reused)."""
    h = hashlib.sha256()
    for f in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        st = f.stat()
        h.update(f"{f.relative_to(checkpoint)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    out = root / f"{checkpoint.name}-{h.hexdigest()[:12]}"
    if (out / "manifest.json").is_file():
        return out
    from nxc.export.exporter import ExportOptions, export_build
    root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{checkpoint.name}-", dir=root))
    try:
        export_build(checkpoint, work / "build", options=ExportOptions())
        shutil.rmtree(out, ignore_errors=True)
        (work / "build").rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def draws(pipe) -> bool:
    """The build has a generator and a signal head (a reply can make a picture)."""
    return pipe.manifest.generator is not None and any(h.kind == "signal" for h in pipe.manifest.heads)


def drawing_stages(pipe) -> set[str]:
    """The Timeline stages of making a picture: the signal heads' graphs, the denoiser and the latent decoder."""
    g = pipe.manifest.generator
    return {h.graph for h in pipe.manifest.heads if h.kind == "signal"} | {g.denoiser, g.decoder}


def draw(pipe, request: DrawRequest, *, seed: int, steps: int | None = None, guidance: float | None = None,
         max_new_tokens: int = 32) -> tuple[list[np.ndarray], float]:
    """Ask `pipe` the request (greedy, pictures seeded `seed`) -> ([H,W,3] uint8 pictures, drawing seconds)."""
    from nxc.runtime.images import blank_image
    from nxc.runtime.timing import Timeline
    blank = blank_image()
    options = {"seed": seed, **({"steps": steps} if steps is not None else {}),
               **({"guidance": guidance} if guidance is not None else {})}
    tl = Timeline()
    result = pipe.chat(blank, request.text, max_new_tokens=max_new_tokens, timeline=tl,
                       head_options={"signal": options})
    stages = drawing_stages(pipe)
    return [im.pixels for im in result.images], sum(e.seconds for e in tl.events if e.stage in stages)


class GenerationScores:
    """Running counts over requests; summary() -> the metrics dict."""

    def __init__(self):
        self.asked = self.found = 0           # requested objects / judged present
        self.misses = self.rejected = 0       # near-miss questions / answered no
        self.counted = self.count_ok = 0      # count judgements (pictures, or a missing picture) / right
        self.seconds: list[float] = []
        self.n = self.drawn = 0
        self.side = 0                         # the first picture's height (the ceiling's pictures are that size)

    def add(self, request: DrawRequest, pictures: list[np.ndarray], seconds: float, judges: Judges) -> None:
        self.n += 1
        if not pictures:
            self.asked += len(request.objects)
            self.counted += 1
            return
        self.drawn += 1
        self.side = self.side or int(pictures[0].shape[0])
        for pixels in pictures:
            img = for_judging(pixels)
            self.seconds.append(seconds / len(pictures))
            self.asked += len(request.objects)
            self.found += sum(judges.present(img, c, s) for c, s in request.objects)
            self.misses += len(request.near_misses)
            self.rejected += sum(not judges.present(img, c, s) for c, s in request.near_misses)
            self.counted += 1
            self.count_ok += judges.count(img) == len(request.objects)

    def summary(self) -> dict:
        return {"recall": self.found / max(1, self.asked),
                "precision": self.rejected / self.misses if self.misses else None,
                "count_accuracy": self.count_ok / max(1, self.counted),
                "seconds_per_picture": float(np.median(self.seconds)) if self.seconds else None,
                "drawn": self.drawn / max(1, self.n), "n": self.n, "pictures": len(self.seconds)}


def evaluate_generation(pipe, judges: Judges | None = None, *, seed: int = 1234, n: int = 100,
                        steps: int | None = None, guidance: float | None = None, progress: bool = True,
                        judges_factory=None) -> dict:
    """The generation metrics of one build's Pipeline; {"n/a": NOT_DRAWING} where it has no generator (the judges
    are not loaded then: `judges_factory()` is called only for a build that draws, when `judges` is None)."""
    if not draws(pipe):
        return {"n/a": NOT_DRAWING}
    judges = judges or judges_factory()
    scores = GenerationScores()
    t0 = time.perf_counter()
    for i, request in enumerate(make_requests(seed, n)):
        pictures, seconds = draw(pipe, request, seed=seed + i, steps=steps, guidance=guidance)
        scores.add(request, pictures, seconds, judges)
        if progress and ((i + 1) % 20 == 0 or i + 1 == n):
            el = time.perf_counter() - t0
            print(f"  generation {i + 1}/{n} {el:.0f} s, eta {el / (i + 1) * (n - i - 1):.0f} s",
                  file=sys.stderr, flush=True)
    out = scores.summary()
    side = scores.side or MIN_SIDE
    out.update({f"ceiling_{k}": v for k, v in judge_ceiling(judges, seed=seed, n=n, side=side).items()})
    out["meta"] = {"seed": seed, "steps": steps, "guidance": guidance, "seconds": time.perf_counter() - t0,
                   "judges": [str(judges.nextchat.manifest.root), str(judges.detector.manifest.root)]}
    return out


def judge_ceiling(judges: Judges, *, seed: int, n: int, side: int = MIN_SIDE) -> dict:
    """{"recall", "precision", "count_accuracy"} of the judges on the true pictures (side px) of
    make_requests(seed, n): the best score a generator can get from these judges on these requests."""
    rng = np.random.default_rng([seed, side])
    scores = GenerationScores()
    for request in make_requests(seed, n):
        scores.add(request, [picture_of(rng, list(request.objects), side=side)], 0.0, judges)
    m = scores.summary()
    return {k: m[k] for k in ("recall", "precision", "count_accuracy")}


def not_applicable(metrics: list[dict]) -> list[str]:
    """Lines naming each run whose generation task is n/a (under nxc-eval's table)."""
    return [f"{task} ({Path(m.get('meta', {}).get('target', '?')).name}): {m[task]['n/a']}"
            for task in ("generation", "grounded_generation", "editing", "modules") for m in metrics if "n/a" in m.get(task, {})]
