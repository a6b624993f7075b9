"""Teach the trained shapes generator GLIGEN's grounding, on CPU (issue 29: the `generate` and `edit` backends of the
embedded VITRON draw each object in its box).

    base generator folder (nxc-train-shapes-generator's: UNet, VAE, CLIP text encoder, tokenizer)
      ─▶ the same UNet as UNet2DConditionModel(attention_type="gated"): its weights loaded, frozen; new in each
         transformer block a GatedSelfAttentionDense and the position_net (phrase embedding ++ Fourier(box) ->
         grounding token). GLIGEN starts its gates at 0 (the base UNet exactly) and trains for 500 k steps; in a
         CPU run of 2000 steps they stayed shut, so here they start at tanh = gate_init (0.5)
      ─▶ DDPM's epsilon objective (+ 0.1 x the predicted clean latents' MSE, so that where an object is counts)
         on shapes pictures with their objects' phrases and boxes
         (nxc.shapes.generator_data.make_grounded_batch): phrases embedded as StableDiffusionGLIGENPipeline embeds
         them (the text encoder's pooled output, frozen), 30 slots, 10% of pictures without grounding and 10% without
         a caption; only the fusers and the position_net learn (GLIGEN's recipe: the base model is kept)
      ─▶ OUT: a diffusers folder (unet/ gated, vae/ text_encoder/ tokenizer/ scheduler/ copied from the base) that
         nxc.model.generator and nxc-export read, and training.json (recipe, losses, minutes).

CLI: nxc-train-shapes-generator --out OUT --gligen BASE [--steps N] [--seed S] [--threads T].
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nxc.model.generator import GLIGEN_OBJECTS, SCHEDULER_FILE, TEXT_ENCODER, TOKENIZER, UNET, VAE, _quiet
from nxc.shapes.generator_data import make_grounded_batch
from nxc.shapes.train import lr_at

PROG = "nxc-train-shapes-generator --gligen"


class GligenTrainError(ValueError):
    """A GLIGEN training run that cannot start: what was expected, what was found, what to do."""


@dataclass(frozen=True)
class GligenTrainConfig:
    steps: int = 1500
    batch_size: int = 32
    lr: float = 1e-3
    warmup: int = 100
    seed: int = 0
    uncond_prob: float = 0.1          # captions dropped (classifier-free guidance stays learnt)
    ungrounded_prob: float = 0.1      # groundings dropped (the null slots mean "no object")
    max_objects: int = 3
    ema_decay: float = 0.995
    threads: int = 1
    x0_weight: float = 0.1            # + this x the clean latents' MSE: the epsilon loss alone hardly sees where an
                                      # object is (at high noise an x0 error is scaled by SNR ~ 0.01), and a CPU run
                                      # of it learned fusers that ignore the boxes (a box moved eps by 5e-6)
    gate_init: float = 0.5            # the fusers' gates tanh(alpha) at the start: GLIGEN's 0 left them shut here
                                      # (2000 steps at 3e-4 moved tanh(alpha) to 0.0001-0.025, recall 0.02)


def gated_unet(base: Path):
    """(the base folder's UNet rebuilt with attention_type "gated" and its weights loaded, the names of the new
    parameters). Raises GligenTrainError when any base weight does not load."""
    from diffusers import UNet2DConditionModel
    with _quiet():
        plain = UNet2DConditionModel.from_pretrained(base / UNET)
    config = {k: v for k, v in dict(plain.config).items() if not k.startswith("_")}
    if config.get("attention_type", "default") != "default":
        raise GligenTrainError(f"{base / UNET}: attention_type {config['attention_type']!r}; the base must be a "
                               "plain text-to-image UNet")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**{**config, "attention_type": "gated"})
    result = unet.load_state_dict(plain.state_dict(), strict=False)
    if result.unexpected_keys or any(".fuser." not in k and not k.startswith("position_net.")
                                     for k in result.missing_keys):
        raise GligenTrainError(f"{base / UNET}: its weights do not fit a gated UNet of its config "
                               f"({result.unexpected_keys[:3]} unexpected, {result.missing_keys[:3]} missing)")
    return unet, set(result.missing_keys)


@torch.no_grad()
def phrase_table(text, tokenizer, phrases: list[str]) -> dict[str, torch.Tensor]:
    """phrase -> the text encoder's pooled output [D], as the GLIGEN pipeline embeds its phrases."""
    ids = tokenizer(phrases, padding=True, return_tensors="pt")
    pooled = text(**ids).pooler_output
    return dict(zip(phrases, pooled))


def grounding_inputs(grounding, table: dict, width: int) -> dict[str, torch.Tensor]:
    """A batch's groundings as the UNet's gligen kwargs: boxes [B,30,4], positive_embeddings [B,30,D], masks [B,30]."""
    b = len(grounding)
    boxes, emb, masks = torch.zeros(b, GLIGEN_OBJECTS, 4), torch.zeros(b, GLIGEN_OBJECTS, width), \
        torch.zeros(b, GLIGEN_OBJECTS)
    for i, (phrases, bx) in enumerate(grounding):
        k = len(phrases)
        if k:
            boxes[i, :k] = torch.from_numpy(bx)
            emb[i, :k] = torch.stack([table[p] for p in phrases])
            masks[i, :k] = 1
    return {"boxes": boxes, "positive_embeddings": emb, "masks": masks}


def train_gligen(base: str | Path, out: str | Path, cfg: GligenTrainConfig = GligenTrainConfig(), *,
                 command: str = "") -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    from nxc.shapes.data import COLOURS, SHAPES
    from nxc.shapes.generator_data import caption_of
    from nxc.shapes.generator_text import encode_captions
    base, out = Path(base), Path(out)
    for part in (UNET, VAE, TEXT_ENCODER, TOKENIZER):
        if not (base / part).is_dir():
            raise GligenTrainError(f"--gligen {base}: no {part}/; give a trained shapes generator folder "
                                   "(nxc-train-shapes-generator --out DIR)")
    if out.resolve() == base.resolve():
        raise GligenTrainError("--out must be a new folder, not the base generator's")
    base_record = json.loads((base / "training.json").read_text()) if (base / "training.json").is_file() else {}
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng([cfg.seed, 29])
    with _quiet():
        vae = AutoencoderKL.from_pretrained(base / VAE).eval()
        text = CLIPTextModel.from_pretrained(base / TEXT_ENCODER).eval()
        tokenizer = CLIPTokenizer.from_pretrained(base / TOKENIZER)
    ddpm = DDPMScheduler.from_pretrained(base / Path(SCHEDULER_FILE).parent)
    unet, new = gated_unet(base)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            p.requires_grad_(name in new)
            if name.endswith(("alpha_attn", "alpha_dense")):
                p.fill_(float(np.arctanh(cfg.gate_init)))
    params = [p for n, p in unet.named_parameters() if n in new]
    ema = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    width = unet.config.cross_attention_dim
    context = tokenizer.model_max_length
    table = phrase_table(text, tokenizer, [caption_of([(c, s)]) for c in COLOURS for s in SHAPES])
    side = vae.config.sample_size
    n_new = sum(p.numel() for p in params)
    print(f"[{PROG}] {base}: {n_new / 1e6:.2f} M new parameters (fusers + position_net) on a frozen "
          f"{sum(p.numel() for p in unet.parameters()) / 1e6 - n_new / 1e6:.2f} M UNet; {cfg.steps} steps",
          flush=True)
    log, t0, window = [], time.perf_counter(), []
    unet.train()
    for step in range(cfg.steps):
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, captions, grounding = make_grounded_batch(rng, cfg.batch_size, side=side, max_objects=cfg.max_objects,
                                                     uncond_prob=cfg.uncond_prob,
                                                     ungrounded_prob=cfg.ungrounded_prob)
        with torch.no_grad():
            z = vae.encode(torch.from_numpy(x)).latent_dist.sample() * vae.config.scaling_factor
            cond = encode_captions(text, tokenizer, captions, context)
        noise = torch.randn_like(z)
        t = torch.randint(0, ddpm.config.num_train_timesteps, (z.shape[0],))
        noisy = ddpm.add_noise(z, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=cond,
                    cross_attention_kwargs={"gligen": grounding_inputs(grounding, table, width)}).sample
        a = ddpm.alphas_cumprod[t].view(-1, 1, 1, 1)
        x0 = (noisy - (1 - a).sqrt() * pred) / a.sqrt()
        eps_mse, x0_mse = F.mse_loss(pred, noise), F.mse_loss(x0, z)
        loss = eps_mse + cfg.x0_weight * x0_mse
        if not np.isfinite(loss.item()):
            raise GligenTrainError(f"step {step}: loss {loss.item()}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - cfg.ema_decay)
        window.append(eps_mse.item())
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            row = {"step": step + 1, "mse": round(float(np.mean(window)), 5), "lr": lr,
                   "seconds": round(time.perf_counter() - t0, 1)}
            window = []
            log.append(row)
            left = (time.perf_counter() - t0) / (step + 1) * (cfg.steps - step - 1)
            print(f"[{PROG}] step {step + 1}/{cfg.steps} mse {row['mse']:.4f} lr {lr:.2e} ({left / 60:.1f} min left)",
                  flush=True)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    out.mkdir(parents=True, exist_ok=True)
    with _quiet():
        unet.save_pretrained(out / UNET)
    for part in (VAE, TEXT_ENCODER, TOKENIZER, Path(SCHEDULER_FILE).parent):
        shutil.copytree(base / part, out / part, dirs_exist_ok=True)
    gates = {n: round(float(p.detach().tanh()), 4) for n, p in unet.named_parameters() if n.endswith(("alpha_attn",
                                                                                             "alpha_dense"))}
    minutes = (time.perf_counter() - t0) / 60
    record = {"what": "GLIGEN's gated attention and position_net trained on the base shapes generator (frozen)",
              "base": {"folder": str(base), "minutes": base_record.get("minutes"),
                       "commands": base_record.get("commands")},
              "config": asdict(cfg), "new_parameters": n_new, "log": log, "gates_tanh": gates,
              "minutes": round(minutes, 1), "commands": [command] if command else [],
              "data": "nxc.shapes.generator_data.make_grounded_batch (64 px shapes scenes, 1-3 objects, boxes = the "
                      "painted shapes' extents)"}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    print(f"[{PROG}] wrote {out} ({minutes:.1f} min)", flush=True)
    return out
