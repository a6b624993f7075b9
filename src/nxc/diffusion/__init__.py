"""The generator's sampler, torch-free (numpy only): diffusers' DDIM / Euler / LCM schedulers (`schedulers`) and the
denoising loop with classifier-free guidance and seeded initial latents (`loop`). The runtime and the torch
reference both sample through it, so both start from the same noise and take the same steps."""
from nxc.diffusion.loop import classifier_free, guide, initial_latents, sample
from nxc.diffusion.schedulers import (SCHEDULERS, DDIMScheduler, EulerDiscreteScheduler, LCMScheduler,
                                      make_scheduler)

__all__ = ["SCHEDULERS", "DDIMScheduler", "EulerDiscreteScheduler", "LCMScheduler", "classifier_free", "guide",
           "initial_latents", "make_scheduler", "sample"]
