"""Export wrappers for the generator's graphs, `denoiser` and `latent_decoder` (nxc.specs.generator_specs).

Each reads diffusers' modules (nxc.model.generator) and leaves them untouched; the sampler (timesteps, the
scheduler's input scaling and step, classifier-free guidance) is the runtime's, in numpy, not in a graph.
"""
from __future__ import annotations

import torch
from torch import nn


class DenoiserGraph(nn.Module):
    """sample [B,C,h,w] (the scheduler's model input), timestep [B] (float32, 0..num_train_timesteps - 1),
    encoder_hidden_states [B,L,D] -> noise [B,C,h,w]: the UNet's epsilon prediction for one step. The runtime's
    call is B = 2, [unconditional, conditional], as StableDiffusionPipeline's."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class LatentDecoderGraph(nn.Module):
    """latents [B,C,h,w] (raw, as the sampler ends) -> pixels [B,3,H,W], RGB in [0, 1]:

        latents / scaling_factor (+ shift_factor, for VAEs that have one) ─ vae.decode ─▶ x in about [-1, 1]
          ─▶ (x / 2 + 0.5).clamp(0, 1)      (diffusers' VaeImageProcessor.postprocess up to its uint8 step)"""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        x = self.vae.decode(z, return_dict=False)[0]
        return (x / 2 + 0.5).clamp(0, 1)
