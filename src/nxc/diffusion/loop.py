"""The denoising loop diffusers' text-to-image pipelines run, in numpy, for the runtime and the torch reference alike:

    latents ─▶ × init_noise_sigma ─▶ for t in timesteps:
                                       x = scale_model_input(latents, t)
                                       guidance > 1: noise = denoise([x, x], t) ─▶ split ─▶ guide(uncond, cond, w)
                                       otherwise:    noise = denoise(x, t)       (cond only)
                                       latents = step(noise, t, latents)

Both sides start from `initial_latents(shape, seed)`, so the same seed gives the same picture in both.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from nxc.diffusion.schedulers import _whole

F32 = np.float32


def initial_latents(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """shape (e.g. [B, 4, H/8, W/8]) float32 standard normal from `np.random.default_rng(seed)`.standard_normal.
    This is numpy's PCG64, NOT torch's generator: a diffusers pipeline given `generator=torch.manual_seed(seed)` draws
    other latents. The nxc torch reference takes its latents from this function too (pass them to diffusers as
    `latents=torch.from_numpy(...)`), so that the same seed gives the same initial latents on both sides. They are
    unit-variance; `sample` scales them by the scheduler's init_noise_sigma."""
    if not (_whole(seed) and seed >= 0):
        raise ValueError(f"seed must be a whole number >= 0, got {seed!r}")
    if not (isinstance(shape, (tuple, list)) and shape and all(_whole(d) and d >= 1 for d in shape)):
        raise ValueError(f"latent shape must be a non-empty sequence of whole numbers >= 1, got {shape!r}")
    return np.random.default_rng(seed).standard_normal(tuple(int(d) for d in shape), dtype=F32)


def _check_guidance(guidance) -> float:
    if not (isinstance(guidance, (int, float, np.integer, np.floating)) and not isinstance(guidance, bool)
            and math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance must be a finite number >= 0 (<= 1: no classifier-free guidance; SD's default "
                         f"7.5), got {guidance!r}")
    return float(guidance)


def classifier_free(guidance: float) -> bool:
    """Whether `sample` runs classifier-free guidance, i.e. batches [uncond, cond]: guidance > 1, diffusers' rule
    (`do_classifier_free_guidance`). At guidance <= 1 only the conditional prediction is made and used as it is,
    whatever the value: diffusers' pipelines do the same."""
    return _check_guidance(guidance) > 1


def guide(noise_uncond: np.ndarray, noise_cond: np.ndarray, guidance: float) -> np.ndarray:
    """Classifier-free guidance (Ho & Salimans, arXiv 2207.12598): eps_u + w (eps_c - eps_u), float32; w = 1 gives
    eps_c, w = 0 eps_u. Refuses a negative or non-finite w."""
    w = F32(_check_guidance(guidance))
    noise_uncond, noise_cond = np.asarray(noise_uncond, F32), np.asarray(noise_cond, F32)
    if noise_uncond.shape != noise_cond.shape:
        raise ValueError(f"guide needs the unconditional and conditional predictions in one shape, got "
                         f"{list(noise_uncond.shape)} and {list(noise_cond.shape)}")
    return noise_uncond + w * (noise_cond - noise_uncond)


def sample(denoise: Callable[[np.ndarray, np.generic], np.ndarray], latents: np.ndarray, scheduler, steps: int,
           guidance: float, *, rng: np.random.Generator | None = None,
           on_step: Callable[[int, int], None] | None = None,
           before_step: Callable[[int, np.generic, np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Run `steps` denoising steps from `latents` ([B, C, H, W] unit-variance noise, e.g. `initial_latents`) and
    return the final latents, [B, C, H, W] float32 (still to be scaled and decoded by the caller).

    The contract with `denoise(x, t) -> noise prediction`, the one model call per step:
      - guidance > 1 (`classifier_free`): x is [2B, C, H, W] = concat([x_B, x_B]); the caller conditions its first
        B rows on the unconditional embedding and the last B on the prompt's, as diffusers' pipelines do;
      - otherwise: x is [B, C, H, W], conditioned on the prompt only.
      t is the scheduler's timestep as a numpy scalar (int64 for DDIM / LCM, float32 for Euler). The result must
      have x's shape; it is taken as float32 (an fp16 graph's output is fine).
    rng: a numpy Generator for schedulers that draw noise between steps (LCM); on_step(i, n) is called after step
    i of n (0-based), for progress or timing; before_step(i, t, latents) -> latents runs at the top of step i,
    before the model input is made (GLIGEN: the fuser's switch, the inpainting blend).
    """
    w = _check_guidance(guidance)
    cfg = w > 1
    scheduler.set_timesteps(steps)
    latents = np.asarray(latents, F32)
    if latents.ndim < 1 or latents.shape[0] < 1:
        raise ValueError(f"latents must be [B, ...] with B >= 1, got shape {list(latents.shape)}")
    latents = latents * scheduler.init_noise_sigma
    n = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if before_step is not None:
            latents = np.asarray(before_step(i, t, latents), F32)
        x = scheduler.scale_model_input(latents, t)
        batch = np.concatenate([x, x]) if cfg else x
        noise = np.asarray(denoise(batch, t), F32)
        if noise.shape != batch.shape:
            raise ValueError(f"denoise returned shape {list(noise.shape)} for an input of shape {list(batch.shape)} "
                             f"at timestep {t}; it must return one noise prediction per input sample")
        if cfg:
            noise = guide(noise[:x.shape[0]], noise[x.shape[0]:], w)
        latents = scheduler.step(noise, t, latents, rng=rng)
        if on_step is not None:
            on_step(i, n)
    return latents
