"""nxc-train-shapes-generator: train the embedded NExT-GPT's generator on shapes pictures, on CPU
(nxc.shapes.train_generator; needs torch and diffusers)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def main(argv: list[str] | None = None) -> int:
    try:
        from nxc.shapes.train_generator import (ARCHS, PROG, GeneratorTrainConfig, GeneratorTrainError,
                                                finetune_decoder, train)
    except ImportError as e:
        print(f"nxc-train-shapes-generator: needs the export extra ({e.name or 'torch'} is not installed): "
              "pip install 'nxc[export]'", file=sys.stderr)
        return 2
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="folder to write (diffusers layout + training.json)")
    ap.add_argument("--steps", type=int, default=None, help=f"UNet + text encoder steps ({GeneratorTrainConfig.unet_steps}; "
                    "with --gligen: the grounding's steps, 1500)")
    ap.add_argument("--vae-steps", type=int, default=GeneratorTrainConfig.vae_steps, help="VAE steps (first)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=GeneratorTrainConfig.threads,
                    help="torch CPU threads (2 only on an otherwise idle 2-core machine)")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="shapes", help="named sizes (test: seconds, useless)")
    ap.add_argument("--resume", action="store_true", help=f"continue from OUT/partial/ (written every "
                                                          f"{GeneratorTrainConfig.checkpoint_every} steps)")
    ap.add_argument("--finetune-decoder", type=int, metavar="N", help="instead of training: fine-tune the VAE "
                    "decoder of the trained folder OUT for N steps, in place (encoder, latents and UNet unchanged)")
    ap.add_argument("--decoder-lr", type=float, default=3e-4, help="--finetune-decoder's learning rate")
    ap.add_argument("--gligen", metavar="BASE", help="instead of training: teach the trained generator BASE GLIGEN's "
                    "grounding (gated attention + position_net, the base frozen) into OUT")
    a = ap.parse_args(argv)
    command = " ".join([PROG, *(sys.argv[1:] if argv is None else argv)])
    if a.gligen is not None:
        from nxc.shapes.train_gligen import GligenTrainConfig, GligenTrainError, train_gligen
        cfg = replace(GligenTrainConfig(), seed=a.seed, threads=a.threads,
                      **({} if a.steps is None else {"steps": a.steps}))
        if min(cfg.steps, cfg.threads) < 1:
            ap.error(f"--steps and --threads must be >= 1, got {cfg.steps}, {cfg.threads}")
        try:
            train_gligen(a.gligen, a.out, cfg, command=command)
        except GligenTrainError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        return 0
    if a.steps is None:
        a.steps = GeneratorTrainConfig.unet_steps
    if a.finetune_decoder is not None:
        if a.finetune_decoder < 1 or a.decoder_lr <= 0:
            ap.error(f"--finetune-decoder must be >= 1 and --decoder-lr > 0, got {a.finetune_decoder}, "
                     f"{a.decoder_lr}")
        try:
            finetune_decoder(a.out, a.finetune_decoder, lr=a.decoder_lr, seed=a.seed, threads=a.threads,
                             command=command)
        except GeneratorTrainError as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2
        return 0
    if min(a.steps, a.vae_steps, a.threads) < 1:
        ap.error(f"--steps, --vae-steps and --threads must be >= 1, got {a.steps}, {a.vae_steps}, {a.threads}")
    cfg = replace(GeneratorTrainConfig(), arch=a.arch, seed=a.seed, unet_steps=a.steps, vae_steps=a.vae_steps,
                  threads=a.threads)
    try:
        train(a.out, cfg, resume=a.resume, command=command)
    except GeneratorTrainError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
