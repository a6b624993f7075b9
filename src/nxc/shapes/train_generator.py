"""Train the embedded NExT-GPT's generator on shapes pictures, on CPU (issue 28 item 5, first half).

    captions ─▶ CLIPTokenizer (shapes words, one token each) ─▶ CLIPTextModel ─▶ [B, L, D] ─┐
    pictures [B,3,64,64] ─▶ AutoencoderKL.encode ─▶ z * scaling_factor [B,4,16,16] + noise ─▶ UNet2DConditionModel
                                                                                               ─▶ eps  (MSE to noise)
Stage "vae":  the AutoencoderKL alone: L1 reconstruction + a small KL (SD's ratio); its scaling_factor is then set
              to 1 / std of the latents, as SD-1.5's 0.18215 was.
Stage "unet": the UNet and the text encoder together, the VAE frozen: DDPM's epsilon objective on diffusers'
              DDPMScheduler built from the scheduler_config.json written beside (SD-1.5's schedule), 10% empty
              captions for classifier-free guidance, an EMA of both (the EMA weights are what is saved).
Writes a diffusers folder (unet/ vae/ scheduler/ text_encoder/ tokenizer/) that nxc.model.generator reads unchanged,
`training.json` (recipe, losses, times) and `samples.png` (a few held-out captions, drawn with nxc's numpy sampler).
`<out>/partial/` holds the state to `--resume` from (and, in stage "unet", a loadable folder to look at).

Sizes ("shapes"): 64x64 pictures; AutoencoderKL blocks 16/32/64 (0.68 M), factor 4, latents 4x16x16; UNet blocks
64/128/128, cross-attention 64 (5.8 M); CLIPTextModel 2 layers x 64 (0.1 M) over L = 16 caption tokens (a 3-object
caption is 13). 64 px, not 32: at 32 px a 3-object picture's star is 3-6 px wide and the perception judges (NExT-Chat
sees 96 px) cannot tell it from a circle; latents 16x16 make the denoiser's work per call (H*W*C^2) that of DESIGN 5's
32x32 pixel-space probe with twice its channels, for captions of up to 3 objects instead of 2 learned tokens.
Measured here (2026-12-07, 1 torch thread, the other core busy with another job's pytest):
  - training, batch 32: VAE 0.75 s a step, UNet + text encoder 0.89 s a step (a 150-step run, 2.1 min). 2 threads ran
    5-14x SLOWER than 1 while the other core was busy (OpenMP waits), hence threads = 1 by default.
  - the default recipe, 1500 VAE + 6000 UNet steps: about 19 + 89 min = 1 h 50 min of CPU (--steps 4000: 80 min).
  - drawing (ONNX Runtime fp32, 1 thread, exported by nxc.export.generator): 20 DDIM steps batched [uncond, cond]
    0.23 s + decode 0.004 s a picture, inside the 0.5 s target.
Stage "decoder" (optional, on a trained folder: --finetune-decoder N): the VAE's decoder alone, its encoder frozen,
so latents, scaling_factor and the UNet stay valid (as sd-vae-ft-mse fine-tuned SD's): sharper star points and
edges in the drawn pictures.
CLI (nxc.shapes.train_generator_cli): nxc-train-shapes-generator --out DIR [--steps N] [--vae-steps N] [--seed S]
[--threads T] [--resume]; nxc-train-shapes-generator --out DIR --finetune-decoder N (a trained folder, in place).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from nxc.model.generator import SCHEDULER_FILE, SD15_DDIM_SCHEDULER, TEXT_ENCODER, TOKENIZER, UNET, VAE, _quiet
from nxc.shapes.generator_data import make_batch, request_captions
from nxc.shapes.generator_samples import sample_pictures, save_grid
from nxc.shapes.generator_text import encode_captions, make_text_encoder, write_caption_tokenizer
from nxc.shapes.train import lr_at

PROG = "nxc-train-shapes-generator"
STAGES = ("vae", "unet")


class GeneratorTrainError(ValueError):
    """A training run that cannot start or go on: the message says what was expected, what was found, what to do."""


@dataclass(frozen=True)
class GeneratorArch:
    """Sizes of the shapes generator. image_size px square pictures; the VAE's len(vae_channels) - 1 downsamplings
    give latents [4, image_size / 2**(n-1), same]; the UNet's blocks are CrossAttnDown for all but the last."""
    image_size: int
    vae_channels: tuple[int, ...]
    unet_channels: tuple[int, ...]
    cross_attention_dim: int
    context_length: int
    text_layers: int
    norm_groups: int           # the UNet's GroupNorm groups
    vae_norm_groups: int
    attention_heads: int


ARCHS = {
    "shapes": GeneratorArch(image_size=64, vae_channels=(16, 32, 64), unet_channels=(64, 128, 128),
                            cross_attention_dim=64, context_length=16, text_layers=2, norm_groups=32,
                            vae_norm_groups=16, attention_heads=4),
    "test": GeneratorArch(image_size=16, vae_channels=(8, 8), unet_channels=(8, 16), cross_attention_dim=16,
                          context_length=16, text_layers=1, norm_groups=4, vae_norm_groups=4, attention_heads=2),
}


@dataclass(frozen=True)
class GeneratorTrainConfig:
    arch: str = "shapes"
    seed: int = 0
    vae_steps: int = 1500
    unet_steps: int = 6000
    batch_size: int = 32
    vae_lr: float = 1e-3
    unet_lr: float = 5e-4
    warmup: int = 100
    kl_weight: float = 1e-6        # on the per-picture KL sum vs the per-pixel L1 sum (SD's VAE ratio)
    uncond_prob: float = 0.1
    max_objects: int = 3
    ema_decay: float = 0.999
    checkpoint_every: int = 500
    threads: int = 1               # 2 threads ran 14x slower than 1 while another process held a core (see module doc)
    sample_steps: int = 20
    sample_guidance: float = 4.0


def make_vae(arch: GeneratorArch):
    from diffusers import AutoencoderKL
    n = len(arch.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=arch.vae_channels,
                         layers_per_block=1, norm_num_groups=arch.vae_norm_groups, sample_size=arch.image_size,
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n)


def make_unet(arch: GeneratorArch):
    from diffusers import UNet2DConditionModel
    n = len(arch.unet_channels)
    latent = arch.image_size // 2 ** (len(arch.vae_channels) - 1)
    return UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, block_out_channels=arch.unet_channels, layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        cross_attention_dim=arch.cross_attention_dim, attention_head_dim=arch.attention_heads,
        norm_num_groups=arch.norm_groups)


class Ema:
    """Exponential moving average of a module list's parameters (what is saved and sampled from)."""

    def __init__(self, modules, decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1 - self.decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (twice puts them back)."""
        for p, s in zip(self.params, self.shadow):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


class Progress:
    """One line every `every` steps: stage, step/total, mean losses since the last line, lr, elapsed, eta."""

    def __init__(self, stage: str, start: int, total: int, every: int = 25):
        self.stage, self.start, self.total, self.every = stage, start, total, every
        self.t0, self.acc = time.perf_counter(), {}

    def update(self, step: int, stats: dict, lr: float) -> dict | None:
        for k, v in stats.items():
            self.acc.setdefault(k, []).append(v)
        if (step + 1) % self.every and step + 1 != self.total:
            return None
        el = time.perf_counter() - self.t0
        done = step + 1 - self.start
        row = {"step": step + 1, **{k: float(np.mean(v)) for k, v in self.acc.items()}, "s_per_step": el / done}
        avg = " ".join(f"{k} {row[k]:.4f}" for k in self.acc)
        print(f"[{PROG} {self.stage}] {step + 1}/{self.total} {avg} lr {lr:.2e} | {el / 60:.1f} min, "
              f"{el / done:.2f} s/step, eta {el / done * (self.total - step - 1) / 60:.1f} min", flush=True)
        self.acc = {}
        return row


def vae_loss(vae, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, dict]:
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample()).sample
    l1 = (rec - x).abs().mean()
    kl = post.kl().mean() / x[0].numel()          # per pixel value, so kl_weight is SD's sum-vs-sum ratio
    return l1 + kl_weight * kl, {"l1": l1.item(), "kl": kl.item() * x[0].numel()}


def unet_loss(unet, text, tokenizer, vae, ddpm, x: torch.Tensor, captions: list[str], context_length: int
              ) -> tuple[torch.Tensor, dict]:
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample() * vae.config.scaling_factor
    noise = torch.randn_like(z)
    t = torch.randint(0, ddpm.config.num_train_timesteps, (z.shape[0],))
    cond = encode_captions(text, tokenizer, captions, context_length)
    pred = unet(ddpm.add_noise(z, noise, t), t, encoder_hidden_states=cond).sample
    loss = F.mse_loss(pred, noise)
    return loss, {"mse": loss.item()}


def decoder_loss(vae, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Stage "decoder": L1 + MSE of the decoder's picture from the frozen encoder's posterior sample."""
    with torch.no_grad():
        z = vae.encode(x).latent_dist.sample()
    rec = vae.decode(z).sample
    l1, mse = (rec - x).abs().mean(), F.mse_loss(rec, x)
    return l1 + mse, {"l1": l1.item(), "mse": mse.item()}


@torch.no_grad()
def latent_scale(vae, rng: np.random.Generator, cfg: GeneratorTrainConfig, arch: GeneratorArch, n: int = 4) -> float:
    """1 / std of the VAE's latent samples over n batches (SD-1.5's scaling_factor was found this way)."""
    zs = [vae.encode(torch.from_numpy(make_batch(rng, cfg.batch_size, side=arch.image_size,
                                                 max_objects=cfg.max_objects, uncond_prob=0)[0])).latent_dist.sample()
          for _ in range(n)]
    return float(1 / torch.cat(zs).std())


def save_folder(out: Path, *, vae, unet=None, text=None, tokenizer_dir: Path | None = None) -> None:
    """The diffusers layout nxc.model.generator reads; unet/ text_encoder/ tokenizer/ only once they exist."""
    import shutil

    from diffusers import DDIMScheduler
    out.mkdir(parents=True, exist_ok=True)
    with _quiet():
        vae.save_pretrained(out / VAE)
        DDIMScheduler(**SD15_DDIM_SCHEDULER).save_config(out / Path(SCHEDULER_FILE).parent)
        if unet is not None:
            unet.save_pretrained(out / UNET)
            text.save_pretrained(out / TEXT_ENCODER)
            if tokenizer_dir != out / TOKENIZER:
                shutil.copytree(tokenizer_dir, out / TOKENIZER, dirs_exist_ok=True)


def _state_path(out: Path) -> Path:
    return out / "partial" / "state.pt"


def _resume(out: Path, cfg: GeneratorTrainConfig) -> dict:
    path = _state_path(out)
    if not path.is_file():
        raise GeneratorTrainError(f"--resume: no {path}; start without --resume (it is written every "
                         f"{cfg.checkpoint_every} steps)")
    state = torch.load(path, weights_only=False)
    saved = GeneratorTrainConfig(**state["config"])
    if (saved.arch, saved.seed) != (cfg.arch, cfg.seed):
        raise GeneratorTrainError(f"--resume: {path} is arch {saved.arch!r} seed {saved.seed}, this command asks for "
                         f"arch {cfg.arch!r} seed {cfg.seed}; pass the same --arch and --seed")
    return state


def train(out: str | Path, cfg: GeneratorTrainConfig = GeneratorTrainConfig(), *, resume: bool = False,
          command: str = "") -> Path:
    """Train (or continue, `resume`) into `out`; returns `out`. Stage lengths come from `cfg` even on resume, so a
    resumed run may be made longer; everything else (arch, seed, rng states, optimiser, EMA) from partial/state.pt."""
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer
    out = Path(out)
    arch = ARCHS[cfg.arch]
    torch.set_num_threads(cfg.threads)
    state = _resume(out, cfg) if resume else None
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tok_dir = write_caption_tokenizer(out / "partial" / TOKENIZER, context_length=arch.context_length)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
    vae, unet = make_vae(arch), make_unet(arch)
    text = make_text_encoder(tokenizer, width=arch.cross_attention_dim, layers=arch.text_layers,
                             context_length=arch.context_length)
    with _quiet():
        ddpm = DDPMScheduler.from_config(SD15_DDIM_SCHEDULER)
    n_params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("vae", vae), ("unet", unet), ("text", text))}
    print(f"[{PROG}] {cfg.arch}: {arch.image_size}px pictures, parameters "
          + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in n_params.items()), flush=True)
    record = {"config": asdict(cfg), "arch": asdict(arch), "parameters": n_params, "log": {s: [] for s in STAGES},
              "seconds": {s: 0.0 for s in STAGES}, "commands": []}
    stage, step = "vae", 0
    if state:
        stage, step, record = state["stage"], state["step"], state["record"]
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        vae.load_state_dict(state["vae"])
        if stage == "unet":
            unet.load_state_dict(state["unet"])
            text.load_state_dict(state["text"])
        print(f"[{PROG}] resuming stage {stage} at step {step} from {_state_path(out)}", flush=True)
    record["commands"].append(command)
    record["config"] = asdict(cfg)

    if stage == "vae":
        vae.train()
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        if state and state["stage"] == "vae":
            opt.load_state_dict(state["opt"])
        _loop("vae", cfg, record, out, rng, step, cfg.vae_steps, opt, cfg.vae_lr, [vae], None,
              lambda x, c: vae_loss(vae, x, cfg.kl_weight),
              lambda: {"vae": vae.state_dict()})
        vae.register_to_config(scaling_factor=latent_scale(vae.eval(), rng, cfg, arch))
        print(f"[{PROG}] vae scaling_factor {vae.config.scaling_factor:.4f}", flush=True)
        stage, step, state = "unet", 0, None
    vae.eval().requires_grad_(False)
    if "scaling_factor" in (state or {}):
        vae.register_to_config(scaling_factor=state["scaling_factor"])
    record["vae_scaling_factor"] = vae.config.scaling_factor

    unet.train(), text.train()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=0.0)
    ema = Ema([unet, text], cfg.ema_decay)
    if state:
        opt.load_state_dict(state["opt"])
        ema.shadow = state["ema"]
    _loop("unet", cfg, record, out, rng, step, cfg.unet_steps, opt, cfg.unet_lr, [unet, text], ema,
          lambda x, c: unet_loss(unet, text, tokenizer, vae, ddpm, x, c, arch.context_length),
          lambda: {"vae": vae.state_dict(), "unet": unet.state_dict(), "text": text.state_dict(),
                   "ema": ema.shadow, "scaling_factor": vae.config.scaling_factor},
          snapshot=lambda: _snapshot(out / "partial", vae, unet, text, ema, tok_dir))
    ema.swap()                                   # the averaged weights are the model
    save_folder(out, vae=vae, unet=unet.eval(), text=text.eval(), tokenizer_dir=tok_dir)
    record["minutes"] = sum(record["seconds"].values()) / 60
    record["torch"], record["diffusers"] = torch.__version__, __import__("diffusers").__version__
    captions = request_captions(cfg.seed + 1000, 6, max_objects=cfg.max_objects)
    pics = sample_pictures(out, captions, steps=cfg.sample_steps, guidance=cfg.sample_guidance, seed=cfg.seed,
                           per_caption=4)
    save_grid(pics, out / "samples.png")
    record["samples"] = {"captions": captions, "steps": cfg.sample_steps, "guidance": cfg.sample_guidance,
                         "seed": cfg.seed, "file": "samples.png (one row per caption, 4 seeds)"}
    (out / "training.json").write_text(json.dumps(record, indent=2))
    print(f"[{PROG}] wrote {out} ({record['minutes']:.1f} min of training)", flush=True)
    return out


def finetune_decoder(out: str | Path, steps: int, *, lr: float = 3e-4, batch_size: int = 32, seed: int = 0,
                     threads: int = 1, warmup: int = 50, command: str = "") -> Path:
    """Fine-tune the VAE's decoder of a trained folder `out` in place (stage "decoder"): the encoder, its latents and
    scaling_factor stay as they are, so the UNet trained on them needs nothing new (Stability AI's sd-vae-ft-mse
    did this to SD's VAE). L1 + MSE of decode(encoder posterior sample) to the picture; cosine schedule. Writes
    vae/, appends to training.json (log "decoder", seconds, commands, minutes) and draws samples.png again."""
    from diffusers import AutoencoderKL
    out = Path(out)
    record_file = out / "training.json"
    if not (out / VAE).is_dir() or not record_file.is_file():
        raise GeneratorTrainError(f"--finetune-decoder: {out} is not a trained generator folder (no {VAE}/ or "
                                  "training.json); train it first with nxc-train-shapes-generator --out DIR")
    record = json.loads(record_file.read_text())
    cfg = GeneratorTrainConfig(**record["config"])
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 77])
    with _quiet():
        vae = AutoencoderKL.from_pretrained(out / VAE)
    vae.requires_grad_(False)
    trained = [vae.decoder, vae.post_quant_conv]
    params = [p for m in trained for p in m.parameters()]
    for p_ in params:
        p_.requires_grad_(True)
    vae.train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    record["log"].setdefault("decoder", [])
    record["seconds"].setdefault("decoder", 0.0)
    _loop("decoder", replace(cfg, batch_size=batch_size, warmup=warmup), record, out, rng, 0, steps, opt, lr,
          trained, None, lambda x, c: decoder_loss(vae, x), None)
    vae.eval()
    with _quiet():
        vae.save_pretrained(out / VAE)
    record.setdefault("decoder_finetune", {}).update(steps=steps, lr=lr, batch_size=batch_size, seed=seed)
    record["commands"].append(command)
    record["minutes"] = sum(record["seconds"].values()) / 60
    samples = record.get("samples") or {}
    if samples.get("captions"):
        pics = sample_pictures(out, samples["captions"], steps=samples["steps"], guidance=samples["guidance"],
                               seed=samples["seed"], per_caption=4)
        save_grid(pics, out / "samples.png")
    record_file.write_text(json.dumps(record, indent=2))
    print(f"[{PROG}] decoder fine-tuned in {out / VAE} ({record['seconds']['decoder'] / 60:.1f} min)", flush=True)
    return out


def _snapshot(folder: Path, vae, unet, text, ema: Ema, tok_dir: Path) -> None:
    ema.swap()
    try:
        save_folder(folder, vae=vae, unet=unet, text=text, tokenizer_dir=tok_dir)
    finally:
        ema.swap()


def _loop(stage, cfg, record, out, rng, start, steps, opt, base_lr, modules, ema, loss_fn, weights,
          snapshot=None) -> None:
    """steps start..steps of one stage: the lr schedule, a batch, loss_fn, a clipped AdamW step, the EMA, the log;
    every cfg.checkpoint_every steps partial/state.pt from weights() (None: no checkpoints, stage "decoder")."""
    arch = ARCHS[cfg.arch]
    params = [p for m in modules for p in m.parameters()]
    prog = Progress(stage, start, steps)
    t_prev = time.perf_counter()
    for step in range(start, steps):
        lr = lr_at(step, steps, base_lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        x, captions = make_batch(rng, cfg.batch_size, side=arch.image_size, max_objects=cfg.max_objects,
                                 uncond_prob=cfg.uncond_prob if stage == "unet" else 0.0)
        loss, stats = loss_fn(torch.from_numpy(x), captions)
        if not math.isfinite(loss.item()):
            again = "" if weights is None else f" or --resume from the last checkpoint in {out / 'partial'}"
            raise GeneratorTrainError(f"{stage} step {step}: loss {loss.item()} ({stats}); lower the learning "
                                      f"rate{again}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            ema.update()
        row = prog.update(step, stats, lr)
        if row:
            record["log"][stage].append(row)
        now = time.perf_counter()
        record["seconds"][stage] += now - t_prev
        t_prev = now
        if weights is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
            (out / "partial").mkdir(parents=True, exist_ok=True)
            torch.save({"config": asdict(cfg), "stage": stage, "step": step + 1, "record": record,
                        "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                        "opt": opt.state_dict(), **weights()}, _state_path(out))
            if snapshot is not None:
                snapshot()


if __name__ == "__main__":
    from nxc.shapes.train_generator_cli import main
    sys.exit(main())
