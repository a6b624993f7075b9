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

    def options(self, options: DrawOptions) -> DrawOptions:
        """`options` with the build's defaults filled in."""
        e = self.entry
        return DrawOptions(steps=options.steps or e.default_steps,
                           guidance=e.default_guidance if options.guidance is None else options.guidance,
                           seed=options.seed, scheduler=options.scheduler or e.default_scheduler)

    def draw(self, conditioning: np.ndarray, options: DrawOptions, *, timeline=None) -> tuple[np.ndarray, DrawOptions]:
        """conditioning [1,L,D] (the projector's) -> ([H,W,3] uint8 RGB, the options used)."""
        from nxc.runtime.timing import NO_TIMELINE
        tl = timeline or NO_TIMELINE
        o = self.options(options)
        e, s = self.entry, self.entry.sizes
        cond = np.asarray(conditioning, np.float32).reshape(1, s.context_length, s.cross_attention_dim)
        scheduler = make_scheduler(o.scheduler, e.scheduler)
        latents = initial_latents((1, s.latent_channels, s.latent_height, s.latent_width), o.seed)
        both = np.concatenate([self.uncond, cond])

        def denoise(x, t):
            with tl.stage(e.denoiser):
                rows = both if len(x) == 2 else cond
                out = self.run(e.denoiser, sample=np.ascontiguousarray(x, np.float32),
                                    timestep=np.full(len(x), t, np.float32), encoder_hidden_states=rows)
            return out["noise"]
        final = sample(denoise, latents, scheduler, o.steps, o.guidance, rng=np.random.default_rng(o.seed + 1))
        with tl.stage(e.decoder):
            pixels = self.run(e.decoder, latents=final)["pixels"][0]
        return (np.clip(pixels, 0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8), o
