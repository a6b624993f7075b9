"""nxc-make-checkpoint: write a random-weight NExT-Chat checkpoint in the official layout, one tensor at a time."""
from __future__ import annotations

import argparse
import sys

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

_EPILOG = """\
The checkpoint is what nxc reads as a released NExT-Chat: config.json (with an "nxc_maker" record of what was made),
generation_config.json, a LLaMA-style tokenizer.model of exactly 32000 pieces + the 5 added tokens (vocab 32005,
whatever --llm says), pytorch_model*.bin or model*.safetensors (sharded with an index past --shard-size), with each
LLaMA layer's RoPE inv_freq buffer as the release's transformers 4.31 saved it, SAM inside as sam.model.*, and the
CLIP tower in OUT/clip (an HF CLIPVisionModel directory). Weights: biases 0, norm weights 1,
the rest normal(0, 0.02), each tensor drawn from its own generator seeded by (--seed, its name): the same seed gives
the same values whatever the shard size or format. Memory: one shard, never the model.

--trigger-prompt TEXT: zero the projector's last Linear weight (every image row becomes its bias, so the reply no
longer depends on the image) and rewrite lm_head's <at> and </s> rows so that the greedy reply to TEXT (NExT-Chat
template with an image, no region boxes) is exactly "<at> <boxes></s>": one box and one mask, each picked token 10
logits and 2x above any other. Other prompts and sampling get no such promise.

OUT is written to a hidden .OUT.partial-<pid> directory and renamed to OUT when complete; an interrupted run leaves
nothing that loads.

example: nxc-make-checkpoint ckpt-7b --llm vicuna-7b --vision clip-vit-l-336 --sam vit_h --dtype fp16 \\
             --trigger-prompt "Where is the dog in the image?"
         nxc-make-checkpoint ckpt-nextgpt --family nextgpt --llm tiny --vision tiny --draw-prompt "Draw a red circle."
             (NExT-GPT-style: [IMG0]..[IMG3], output projector, a tiny diffusers generator in OUT/generator)
         nxc-make-checkpoint ckpt-vitron-7b --family vitron --llm vicuna-7b --vision clip-vit-l-336 --sam vit_h \\
             --generator gligen
             (VITRON-7B's layout as nxc deploys it: NExT-Chat-7B + VITRON's region extractor, GLIGEN's SD-1.4 gated
             UNet with a CLIP-L-sized text encoder in OUT/generator, modules.json; nxc-export reads all of it)
         nxc-make-checkpoint ckpt-nextgpt-7b --family nextgpt --llm vicuna-7b --vision imagebind-huge \\
             --projector nextgpt --generator sd-1.5 --dtype fp16
             (NExT-GPT-7B's layout, one tensor at a time: Vicuna-7B + 9 added tokens, ImageBind-huge-sized tower,
             NExT-GPT's output projector, an SD-1.5-sized generator; 16.7 GB, peak memory about one shard)
"""


def parse_size(text: str) -> int:
    """'5GB', '500MB', '1.5GiB', '123456' -> bytes (decimal units as HF's max_shard_size; KiB/MiB/GiB binary)."""
    s = str(text).strip().upper().replace(" ", "")
    num = s.rstrip("KMGTIB")
    unit = s[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = None
    if value is None or unit not in _UNITS or not value > 0 or value != value or value * _UNITS[unit] < 1:
        raise ValueError(f"--shard-size {text!r} is not a positive size; expected e.g. 5GB, 500MB, 2GiB or a "
                         "number of bytes.")
    return int(value * _UNITS[unit])


def parser() -> argparse.ArgumentParser:
    from nxc.config import LLAMA_SIZES, PROJECTOR_SIZES, SAM_SIZES, VISION_SIZES

    ap = argparse.ArgumentParser(prog="nxc-make-checkpoint", description=__doc__, epilog=_EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", metavar="OUT", help="checkpoint directory to create (must not exist or be empty)")
    ap.add_argument("--llm", required=True, metavar="NAME", help=f"LLaMA size: {', '.join(LLAMA_SIZES)}")
    ap.add_argument("--vision", required=True, metavar="NAME", help=f"CLIP tower size: {', '.join(VISION_SIZES)}")
    ap.add_argument("--sam", metavar="NAME", help=f"SAM size: {', '.join(SAM_SIZES)} (NExT-Chat only, required there)")
    ap.add_argument("--family", choices=("nextchat", "nextgpt", "vitron"), default="nextchat",
                    help="nextchat (default): NExT-Chat, written one tensor at a time; vitron: NExT-Chat's layout + "
                         "VITRON's region extractor + a GLIGEN generator in OUT/generator + modules.json (its "
                         "module calls; nxc.model.maker_vitron); nextgpt: a NExT-GPT-style "
                         "model (nxc.model.nextgpt: signal tokens [IMG0]..[IMG3], output projector, a diffusers "
                         "generator in OUT/generator), held in memory as float32 safetensors up to 2 B parameters, "
                         "written one tensor at a time above that or when --dtype, --format or --shard-size is given")
    ap.add_argument("--projector", default="tiny", metavar="NAME",
                    help=f"--family nextgpt: output projector size: {', '.join(PROJECTOR_SIZES)} (default tiny)")
    ap.add_argument("--generator", default="tiny", choices=("tiny", "sd-1.5", "gligen"),
                    help="--family nextgpt: tiny (default) or sd-1.5 (Stable Diffusion 1.5's UNet and VAE sizes, "
                         "3.4 GB in float32; needs --projector nextgpt); --family vitron: tiny (default) or gligen "
                         "(GLIGEN's SD-1.4 gated UNet, SD's VAE, a CLIP-L-sized text encoder)")
    ap.add_argument("--draw-prompt", metavar="TEXT",
                    help="--family nextgpt, held in memory: make the greedy reply to TEXT "
                         "'[IMG0][IMG1][IMG2][IMG3]</s>' for any image")
    ap.add_argument("--dtype", metavar="{fp16,bf16,fp32}", help="weight dtype (default fp16)")
    ap.add_argument("--format", metavar="{bin,safetensors}",
                    help="bin: torch.save zip shards (memory-mappable); safetensors (default bin)")
    ap.add_argument("--shard-size", metavar="SIZE",
                    help="largest shard, e.g. 5GB, 500MB, 2GiB or bytes (default 5GB, like the release)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every tensor (default 0)")
    ap.add_argument("--trigger-prompt", metavar="TEXT",
                    help="make the greedy reply to TEXT '<at> <boxes></s>' for any image (see below)")
    return ap


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        shard_bytes = None if a.shard_size is None else parse_size(a.shard_size)
    except ValueError as e:
        print(f"nxc-make-checkpoint: {e}", file=sys.stderr)
        return 2
    try:
        from nxc.config import ConfigError
        from nxc.model.maker import DEFAULT_SHARD_BYTES, MakerError, make_checkpoint, maker_config
    except ImportError as e:
        return _needs_export_extra(e)
    if a.family == "nextgpt":
        return _main_nextgpt(a, shard_bytes)
    vitron = a.family == "vitron"
    if a.sam is None or a.draw_prompt is not None or a.generator not in (("tiny", "gligen") if vitron else ("tiny",)):
        print(f"nxc-make-checkpoint: a {'VITRON' if vitron else 'NExT-Chat'} checkpoint needs --sam NAME (and takes "
              f"--trigger-prompt, not --draw-prompt{', --generator tiny or gligen' if vitron else ' or --generator'})",
              file=sys.stderr)
        return 2
    try:
        from dataclasses import replace
        config = maker_config(a.llm, a.vision, a.sam)
        size_names = {"llm": a.llm, "vision": a.vision, "sam": a.sam}
        more = {}
        if vitron:
            from nxc.model.maker import DTYPES, _log
            from nxc.model.maker_vitron import generator_bytes, vitron_extras
            config = replace(config, region_encoder=True)
            size_names["generator"] = a.generator
            dt = DTYPES.get(a.dtype or "fp16")          # an unknown --dtype: make_checkpoint refuses it
            more = {"extras": vitron_extras(a.generator, seed=a.seed, dtype=dt, log=_log),
                    "extra_bytes": generator_bytes(a.generator, 4 if dt is None else dt.itemsize)}
        make_checkpoint(a.out, config=config, dtype=a.dtype or "fp16", fmt=a.format or "bin",
                        shard_bytes=shard_bytes or DEFAULT_SHARD_BYTES, seed=a.seed,
                        trigger_prompt=a.trigger_prompt, size_names=size_names, **more)
    except (MakerError, ConfigError) as e:
        print(f"nxc-make-checkpoint: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return _not_written(e, a.out)
    return 0


def _main_nextgpt(a, shard_bytes: int | None) -> int:
    if a.sam is not None or a.trigger_prompt is not None:
        print("nxc-make-checkpoint: --family nextgpt takes --llm, --vision, --projector, --generator, --seed, "
              "--draw-prompt, --dtype, --format and --shard-size (no SAM, no --trigger-prompt)", file=sys.stderr)
        return 2
    try:
        from nxc.model.maker_nextgpt import MakerError, make_nextgpt_checkpoint
    except ImportError as e:
        return _needs_export_extra(e)
    try:
        make_nextgpt_checkpoint(a.out, llm=a.llm, vision=a.vision, projector=a.projector, generator=a.generator,
                                seed=a.seed, draw_prompt=a.draw_prompt, dtype=a.dtype, fmt=a.format,
                                shard_bytes=shard_bytes)
    except MakerError as e:
        print(f"nxc-make-checkpoint: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        return _not_written(e, a.out)
    return 0


def _needs_export_extra(e: ImportError) -> int:
    print(f"nxc-make-checkpoint: needs the export extra ({e.name} is not installed): pip install 'nxc[export]'",
          file=sys.stderr)
    return 2


def _not_written(e: OSError, out) -> int:
    print(f"nxc-make-checkpoint: {e.strerror or e} ({e.filename or out}); nothing was written to {out}.",
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
