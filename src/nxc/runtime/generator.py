"""A build's generator at run time: conditioning rows in, a picture out (numpy sampler, the build's graphs).

    conditioning [1,L,D] ─┐   uncond.npy [1,L,D] (no text encoder at run time)
                          ▼
    initial_latents(seed) ─▶ nxc.diffusion.sample: per step one `denoiser` call on [uncond, cond] (guidance > 1)
                          ─▶ guided noise ─▶ scheduler.step ─▶ final latents ─▶ `latent_decoder` ─▶ [H,W,3] uint8

The sampler is nxc.diffusion's (diffusers' DDIM / Euler / LCM step for step); the scheduler's configuration is the
one the model shipped (the manifest's `generator.scheduler`), its name and steps / guidance per call.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nxc.diffusion import SCHEDULERS, initial_latents, make_scheduler, sample
from nxc.manifest import BuildError


@dataclass(frozen=True)
class DrawOptions:
    """How one picture is drawn: None takes the build's default (manifest generator.default_*)."""
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    scheduler: str | None = None

    @classmethod
    def parse(cls, options) -> "DrawOptions":
        """From a DrawOptions or a dict {steps, guidance, seed, scheduler}; one-line ValueError on a bad value."""
        if isinstance(options, DrawOptions):
            d = vars(options)
        elif isinstance(options, dict):
            unknown = sorted(set(options) - {"steps", "guidance", "seed", "scheduler"})
            if unknown:
                raise ValueError(f"picture options are steps, guidance, seed and scheduler; got {unknown}")
            d = dict(options)
        else:
            raise ValueError(f"picture options must be a dict {{steps, guidance, seed, scheduler}}, got {options!r}")
        steps, guidance, seed, name = d.get("steps"), d.get("guidance"), d.get("seed", 0), d.get("scheduler")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1):
            raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
        if guidance is not None and (isinstance(guidance, bool) or not isinstance(guidance, (int, float))
                                     or not np.isfinite(guidance) or guidance < 0):
            raise ValueError(f"guidance must be a finite number >= 0 (<= 1: no classifier-free guidance), "
                             f"got {guidance!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
        if name is not None and name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}: expected one of {', '.join(SCHEDULERS)}")
        return cls(steps=None if steps is None else int(steps), guidance=None if guidance is None else float(guidance),
                   seed=int(seed), scheduler=name)


class Generator:
    """A generator entry bound to a graph runner. draw(conditioning) -> (pixels, the options used).

    entry: the manifest's GeneratorEntry; uncond: [1,L,D] float32; run(graph, **feeds) -> {output: array} (a
    Pipeline's run, or any backend's runners)."""

    def __init__(self, *, entry, uncond: np.ndarray, run, tokenizer=None):
        self.entry, self.uncond, self.run = entry, np.asarray(uncond, np.float32), run
        self.tokenizer = tokenizer          # nxc.clip_tokenizer.ClipTokenizer of the build's text encoder, or None

    @classmethod
    def from_pipeline(cls, pipe) -> "Generator":
        entry = pipe.manifest.generator
        if entry is None:
            raise BuildError(f"{pipe.manifest.root}: this build has no generator; it answers in text (re-export "
                             "a model that draws, e.g. NExT-GPT, to get pictures)")
        tokenizer = None
        if entry.tokenizer is not None:
            from nxc.clip_tokenizer import ClipTokenizer
            tokenizer = ClipTokenizer.from_folder(pipe.manifest.path(entry.tokenizer))
        return cls(entry=entry, uncond=np.load(pipe.manifest.path(entry.uncond_file)), run=pipe.run,
                   tokenizer=tokenizer)

    def text_conditioning(self, text: str, *, timeline=None) -> np.ndarray:
        """[1,L,D]: `text` through the build's CLIP tokenizer and text_encoder graph (StableDiffusionPipeline's
        prompt encoding); a build without a text encoder cannot (BuildError)."""
        from nxc.runtime.timing import NO_TIMELINE
        e = self.entry
        if e.text_encoder is None or self.tokenizer is None:
            raise BuildError("this build's generator has no text encoder (its pictures come from a projector); "
                             "export the generator with its text encoder to draw from text")
        ids = np.asarray([self.tokenizer.encode(text, max_length=e.sizes.context_length)], np.int64)
        with (timeline or NO_TIMELINE).stage(e.text_encoder):
            return self.run(e.text_encoder, input_ids=ids)["conditioning"]

    def phrase_embeddings(self, phrases, *, timeline=None) -> np.ndarray:
        """[N, D]: each phrase through the CLIP tokenizer and the text_encoder graph's pooled output, GLIGEN's
        phrase embedding (`text_encoder(**tokenizer(phrases, padding=True)).pooler_output`)."""
        from nxc.runtime.timing import NO_TIMELINE
        e = self.entry
        if e.text_encoder is None or self.tokenizer is None:
            raise BuildError("this build's generator has no text encoder to embed grounding phrases; re-export it")
        ids = np.asarray([self.tokenizer.encode(p, max_length=e.sizes.context_length) for p in phrases], np.int64)
        with (timeline or NO_TIMELINE).stage(e.text_encoder):
            return self.run(e.text_encoder, input_ids=ids)["pooled"]

    def grounding_feeds(self, phrases, boxes, *, timeline=None) -> dict:
        """The denoiser's GLIGEN inputs for ONE conditional row: boxes [1,N,4], phrase_embeddings [1,N,P],
        object_mask [1,N], the pipeline's 30 slots (N = sizes.grounding_objects) filled in order, the rest zero.
        boxes: [K,4] xyxy in [0, 1] of the picture; K phrases, 0 <= K <= N."""
        s = self.entry.sizes
        n = s.grounding_objects
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        if len(phrases) != len(boxes):
            raise ValueError(f"grounding takes one box per phrase, got {len(phrases)} phrases and {len(boxes)} boxes")
        if len(boxes) > n:
            raise ValueError(f"at most {n} grounded objects per picture (GLIGEN's slots), got {len(boxes)}")
        if len(boxes) and (not np.isfinite(boxes).all() or (boxes < 0).any() or (boxes > 1).any()
                           or (boxes[:, 2:] <= boxes[:, :2]).any()):
            raise ValueError(f"grounding boxes are xyxy fractions of the picture, 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 "
                             f"<= 1; got {boxes.round(3).tolist()}")
        feeds = {"boxes": np.zeros((1, n, 4), np.float32), "phrase_embeddings": np.zeros((1, n, s.phrase_dim),
                                                                                         np.float32),
                 "object_mask": np.zeros((1, n), np.float32)}
        if len(boxes):
            feeds["boxes"][0, :len(boxes)] = boxes
            feeds["phrase_embeddings"][0, :len(boxes)] = self.phrase_embeddings(list(phrases), timeline=timeline)
            feeds["object_mask"][0, :len(boxes)] = 1
        return feeds

    def source_latents(self, pixels: np.ndarray, rng: np.random.Generator, *, timeline=None) -> np.ndarray:
        """[1,C,h,w]: a picture ([H,W,3] uint8 at the generator's size) through the latent_encoder graph, sampled
        as diffusers' latent_dist.sample() does (mean + std * one standard normal draw of `rng`)."""
        from nxc.runtime.timing import NO_TIMELINE
        e, s = self.entry, self.entry.sizes
        if e.encoder is None:
            raise BuildError("this build's generator has no latent_encoder graph: it cannot edit a picture (export a "
                             "GLIGEN generator to edit)")
        px = np.asarray(pixels)
        if px.shape != (s.image_height, s.image_width, 3) or px.dtype != np.uint8:
            raise ValueError(f"the picture to edit must be uint8 [{s.image_height}, {s.image_width}, 3] (the "
                             f"generator's size), got {px.dtype} {list(px.shape)}")
        with (timeline or NO_TIMELINE).stage(e.encoder):
            out = self.run(e.encoder, pixels=(px.astype(np.float32) / 255).transpose(2, 0, 1)[None].copy())
        mean, std = out["latent_mean"], out["latent_std"]
        return (mean + std * rng.standard_normal(mean.shape, dtype=np.float32)).astype(np.float32)

    def options(self, options: DrawOptions) -> DrawOptions:
        """`options` with the build's defaults filled in."""
        e = self.entry
        return DrawOptions(steps=options.steps or e.default_steps,
                           guidance=e.default_guidance if options.guidance is None else options.guidance,
                           seed=options.seed, scheduler=options.scheduler or e.default_scheduler)

    def draw(self, conditioning: np.ndarray, options: DrawOptions, *, grounding=None, source=None,
             timeline=None) -> tuple[np.ndarray, DrawOptions]:
        """conditioning [1,L,D] (the projector's, or text_conditioning's) -> ([H,W,3] uint8 RGB, the options used).

        GLIGEN generators (sizes.grounded) only:
          grounding = (phrases, boxes [K,4] xyxy in [0, 1]): each phrase drawn in its box, the gated attention on for
            the first int(grounding_beta * steps) steps (StableDiffusionGLIGENPipeline's scheduled sampling); the
            unconditional row's object_mask is 0, as the pipeline's. Without it no object is grounded and the
            gated attention stays off (the base UNet).
          source = [H,W,3] uint8 at the generator's size: GLIGEN's inpainting. The picture outside the boxes is
            kept: its latents (latent_encoder, sampled), noised to each step's timestep, replace the latents there
            at the top of every step; an inpainting UNet (sizes.inpaint_channels) also sees [source latents x mask,
            mask] beside its input. The draws come from np.random.default_rng(seed + 2): the source latent's noise
            first, then one per step (diffusers: latent_dist.sample(), then torch.randn_like per step)."""
        from nxc.runtime.timing import NO_TIMELINE
        tl = timeline or NO_TIMELINE
        o = self.options(options)
        e, s = self.entry, self.entry.sizes
        cond = np.asarray(conditioning, np.float32).reshape(1, s.context_length, s.cross_attention_dim)
        scheduler = make_scheduler(o.scheduler, e.scheduler)
        latents = initial_latents((1, s.latent_channels, s.latent_height, s.latent_width), o.seed)
        both = np.concatenate([self.uncond, cond])
        extra, before_step = self._gligen(grounding, source, o, scheduler, tl)

        def denoise(x, t):
            with tl.stage(e.denoiser):
                rows = both if len(x) == 2 else cond
                feeds = extra(len(x))
                if "inpaint" in feeds:
                    x = np.concatenate([x, np.repeat(feeds.pop("inpaint"), len(x), axis=0)], axis=1)
                out = self.run(e.denoiser, sample=np.ascontiguousarray(x, np.float32),
                               timestep=np.full(len(x), t, np.float32), encoder_hidden_states=rows, **feeds)
            return out["noise"]
        final = sample(denoise, latents, scheduler, o.steps, o.guidance, rng=np.random.default_rng(o.seed + 1),
                       before_step=before_step)
        with tl.stage(e.decoder):
            pixels = self.run(e.decoder, latents=final)["pixels"][0]
        return (np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8), o

    def _gligen(self, grounding, source, o: DrawOptions, scheduler, tl):
        """(extra(batch) -> the denoiser's GLIGEN feeds for this step, before_step hook or None) for draw."""
        e, s = self.entry, self.entry.sizes
        if not s.grounded:
            if grounding is not None or source is not None:
                raise BuildError("this build's generator is not GLIGEN's (no gated attention): it cannot ground "
                                 "phrases in boxes or edit a picture; export a GLIGEN generator for that")
            return (lambda batch: {}), None
        phrases, boxes = grounding if grounding is not None else ((), np.zeros((0, 4), np.float32))
        cond = self.grounding_feeds(phrases, boxes, timeline=tl)
        uncond = {**cond, "object_mask": np.zeros_like(cond["object_mask"])}
        if s.inpaint_channels and source is None:
            raise ValueError("this generator is GLIGEN's inpainting model: it draws into a picture, give one to edit")
        state = {"gate": np.float32(1 if len(phrases) else 0), "inpaint": None}
        grounded_steps = int(e.grounding_beta * o.steps)

        def extra(batch):
            rows = [uncond, cond] if batch == 2 else [cond]
            feeds = {k: np.concatenate([r[k] for r in rows]) for k in cond}
            feeds["grounding"] = np.full(batch, state["gate"], np.float32)
            if state["inpaint"] is not None:
                feeds["inpaint"] = state["inpaint"]
            return feeds
        if source is None:
            def switch(i, t, latents):
                if i == grounded_steps:
                    state["gate"] = np.float32(0)
                return latents
            return extra, switch
        rng = np.random.default_rng(o.seed + 2)
        src = self.source_latents(source, rng, timeline=tl)
        keep = outside_boxes(boxes, s.latent_height, s.latent_width)[None, None]      # 1 = keep the source
        if s.inpaint_channels:
            state["inpaint"] = np.concatenate([src * keep, keep], axis=1).astype(np.float32)

        def blend(i, t, latents):
            if i == grounded_steps:
                state["gate"] = np.float32(0)
            noised = scheduler.add_noise(src, rng.standard_normal(src.shape, dtype=np.float32), t)
            return noised * keep + latents * (np.float32(1) - keep)
        return extra, blend


def outside_boxes(boxes, height: int, width: int) -> np.ndarray:
    """[h, w] float32: 0 inside any box (xyxy fractions), 1 elsewhere, cut as StableDiffusionGLIGENPipeline's
    draw_inpaint_mask_from_boxes cuts it (int() of the box's ends in latent cells; x by the width, y by the height,
    which for its square latents is the same)."""
    keep = np.ones((height, width), np.float32)
    for x0, y0, x1, y1 in np.asarray(boxes, np.float64).reshape(-1, 4):
        keep[int(y0 * height):int(y1 * height), int(x0 * width):int(x1 * width)] = 0
    return keep
