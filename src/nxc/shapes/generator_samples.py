"""Drawing with a trained shapes generator, to look at it: captions -> pictures through the folder's torch UNet, VAE
and text encoder, stepped by nxc's own numpy sampler (nxc.diffusion), and a grid PNG of them.

nxc-train-shapes-generator saves such a grid (samples.png) at the end of training; `nxc-eval generation` judges
pictures made through the exported runtime instead.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from nxc.model.generator import TEXT_ENCODER, TOKENIZER, _quiet, load_generator
from nxc.shapes.generator_text import encode_captions


@torch.no_grad()
def sample_pictures(folder: str | Path, captions: list[str], *, steps: int = 20, guidance: float = 4.0,
                    seed: int = 0, per_caption: int = 1, scheduler: str = "ddim") -> np.ndarray:
    """[len(captions), per_caption, H, W, 3] uint8: each caption drawn per_caption times by the folder's torch
    UNet + VAE through nxc's numpy sampler (nxc.diffusion.sample, classifier-free guidance against the text
    encoder's "" as nxc.model.generator.unconditional_conditioning makes it), latents from initial_latents(seed)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from nxc.diffusion import initial_latents, make_scheduler, sample
    folder = Path(folder)
    unet, vae, config, sizes = load_generator(folder)
    with _quiet():
        tokenizer = CLIPTokenizer.from_pretrained(folder / TOKENIZER, local_files_only=True)
        text = CLIPTextModel.from_pretrained(folder / TEXT_ENCODER, local_files_only=True).eval()
    texts = [c for c in captions for _ in range(per_caption)]
    cond = encode_captions(text, tokenizer, texts, sizes.context_length)
    both = torch.cat([encode_captions(text, tokenizer, [""] * len(texts), sizes.context_length), cond])

    def denoise(x: np.ndarray, t) -> np.ndarray:
        ctx = both if x.shape[0] == both.shape[0] else cond
        return unet(torch.from_numpy(x), torch.tensor(int(t)), encoder_hidden_states=ctx).sample.numpy()

    shape = (len(texts), sizes.latent_channels, sizes.latent_height, sizes.latent_width)
    z = sample(denoise, initial_latents(shape, seed), make_scheduler(scheduler, config), steps, guidance)
    img = (vae.decode(torch.from_numpy(z) / sizes.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    img = (img.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return img.reshape(len(captions), per_caption, *img.shape[1:])


def save_grid(pictures: np.ndarray, path: str | Path, *, zoom: int = 2) -> None:
    """[R, C, H, W, 3] uint8 -> one PNG, R rows x C columns, 2 px white gutters, each picture `zoom`x (nearest)."""
    from PIL import Image
    r, c, h, w, _ = pictures.shape
    grid = np.full((r * (h + 2), c * (w + 2), 3), 255, np.uint8)
    for i in range(r):
        for j in range(c):
            grid[i * (h + 2):i * (h + 2) + h, j * (w + 2):j * (w + 2) + w] = pictures[i, j]
    Image.fromarray(grid).resize((grid.shape[1] * zoom, grid.shape[0] * zoom), Image.NEAREST).save(path)
