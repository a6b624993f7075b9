"""nxc-make-checkpoint --family nextgpt: a random-weight NExT-GPT-style checkpoint (nxc.model.nextgpt's layout).

    registry names (--llm, --vision, --projector, --generator) ─▶ NextChatConfig(projector=...), vocab 32000 + 5 + 4
    in memory (up to MAX_PARAMS, float32 safetensors; the default for the tiny and shapes sizes):
        ─▶ NextGpt built, torch seed --seed (HF's own initialisation) ─▶ generator/ (seed + 1)
        ─▶ [--draw-prompt TEXT] mm_projector's weight zeroed (every image row is its bias: the reply no longer
           depends on the image); hiddens h1 (after TEXT's prompt) and h3 (after [IMG0..3] fed) from the model;
           lm_head's [IMG0] and </s> rows rewritten in span(h1, h3) so the greedy reply is [IMG0]..[IMG3]</s>
        ─▶ save_nextgpt into .OUT.partial-<pid> ─▶ loaded back (load_nextgpt) ─▶ renamed to OUT
    one tensor at a time (above MAX_PARAMS, e.g. NExT-GPT-7B, or when --dtype / --format / --shard-size is given):
        ─▶ NextGpt and its CLIP tower on the meta device: [(official name, shape, init)] (nxc.model.maker's plan)
        ─▶ model*.safetensors / pytorch_model*.bin shards (+ index) and clip/ written by nxc.model.maker's writer,
           each tensor drawn from its own generator seeded by (--seed, name), in --dtype
        ─▶ generator/ (seed + 1): make_tiny_generator, or make_sd15_generator one module at a time
        ─▶ config.json (+ "nxc_maker"), tokenizer files ─▶ names and shapes checked, load_nextgpt(llm=False)
           ─▶ renamed to OUT
       Memory: one shard (--shard-size, 5 GB by default) and, for sd-1.5, the UNet's largest module; never the model.

Generators (--generator): tiny (make_tiny_generator: cross-attention width and context length from the
projector's out_dim and num_queries; a tiny text encoder in memory, a random uncond.npy when streamed) or sd-1.5
(Stable Diffusion 1.5's UNet and VAE sizes, a random uncond.npy [1, 77, 768], no text encoder; 3.4 GB in float32,
the --dtype of the checkpoint when streamed; needs a projector making [77, 768], e.g. --projector nextgpt).
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from nxc import names
from nxc.config import GENERATOR_SIZES, LLAMA_SIZES, PROJECTOR_SIZES, VISION_SIZES, NextChatConfig
from nxc.model.maker_base import PROG, MakerError, pick_sizes

MAX_PARAMS = 2_000_000_000   # the in-memory maker holds the model in float32 memory (8 GB at this size)
LEAD = 10.0          # the planted tokens' logit lead over any other (and 2x), as the NExT-Chat trigger's
GENERATORS = ("tiny", "sd-1.5")


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def nextgpt_maker_config(llm: str, vision: str, projector: str) -> NextChatConfig:
    from nxc.model.sp_files import LLAMA_BASE_VOCAB
    llm_sizes, vision_sizes, proj = pick_sizes(("--llm", LLAMA_SIZES, llm), ("--vision", VISION_SIZES, vision),
                                               ("--projector", PROJECTOR_SIZES, projector))
    vocab = LLAMA_BASE_VOCAB + len(names.ADDED_TOKENS) + len(names.SIGNAL_TOKENS)
    return NextChatConfig(llm=replace(llm_sizes, vocab_size=vocab), vision=vision_sizes, sam=None,
                          mm_hidden_size=vision_sizes.hidden_size, mm_depth=1,
                          projector=replace(proj, llm_hidden=llm_sizes.hidden_size))


def llm_params(config: NextChatConfig) -> int:
    """The LLaMA's parameters (embeddings, lm_head, attention and MLP weights)."""
    c = config.llm
    return c.vocab_size * c.hidden_size * 2 + c.num_layers * (4 * c.hidden_size ** 2
                                                             + 3 * c.hidden_size * c.intermediate_size)


def nextgpt_plan(config: NextChatConfig) -> tuple[list, list]:
    """(checkpoint TensorSpecs under official names, CLIP directory TensorSpecs under `vision_model.*`) of a NextGpt
    built on the meta device: no weight is allocated. No RoPE buffers (nxc's layout, as save_nextgpt writes it)."""
    from nxc.model.checkpoint import official_key
    from nxc.model.maker import module_specs
    from nxc.model.nextgpt import NextGpt
    with torch.device("meta"):
        model = NextGpt(config=config)
    return (module_specs(model, lambda k: None if k.startswith("vision_tower.") else official_key(k)),
            module_specs(model.vision_tower, lambda k: "vision_model." + k))


def _check_generator(generator: str, config: NextChatConfig, projector: str) -> None:
    if generator not in GENERATORS:
        raise MakerError(f"unknown --generator {generator!r}; choose one of {', '.join(GENERATORS)}.")
    if generator == "tiny":
        return
    g, p = GENERATOR_SIZES[generator], config.projector
    if (g.context_length, g.cross_attention_dim) != (p.num_queries, p.out_dim):
        raise MakerError(f"--generator {generator} takes conditioning [{g.context_length}, {g.cross_attention_dim}], "
                         f"--projector {projector} makes [{p.num_queries}, {p.out_dim}]; use --projector nextgpt.")


def make_generator(folder: Path, generator: str, config: NextChatConfig, *, seed: int, dtype=None,
                   text_encoder: bool = True, log=_log) -> Path:
    """The diffusers folder `generator` ("tiny" | "sd-1.5") at `folder`, sized for `config`'s projector."""
    from nxc.model.generator import make_sd15_generator, make_tiny_generator
    if generator == "sd-1.5":
        return make_sd15_generator(folder, seed=seed, dtype=dtype, log=lambda m: log(f"[{PROG}] generator/{m}"))
    return make_tiny_generator(folder, seed=seed, context_length=config.projector.num_queries,
                               cross_attention_dim=config.projector.out_dim, text_encoder=text_encoder)


def _generator_bytes(generator: str, itemsize: int) -> int:
    from nxc.model.generator import sd15_numel
    return sd15_numel() * itemsize if generator == "sd-1.5" else 16 << 20


@torch.no_grad()
def plant_drawing(model, tokenizer, prompt: str, log=_log) -> dict:
    """Make the greedy reply to `prompt` (any image) `[IMG0][IMG1][IMG2][IMG3]</s>`: zero mm_projector's weight,
    then rewrite lm_head's [IMG0] and </s> rows (the vectors of span(h1, h3) giving each its logit at its own step
    and 0 at the other's, LEAD above and 2x the largest other logit). Returns what it did."""
    from PIL import Image
    from transformers import DynamicCache

    from nxc.model.nextgpt_reference import NextGptReferenceChat
    model.mm_projector[-1].weight.zero_()
    chat = NextGptReferenceChat(model=model, tokenizer=tokenizer)
    ids, emb = chat.prefill(Image.new("RGB", (32, 32), "white"), prompt)
    cache = DynamicCache()
    _, h1 = model.llm_step(torch.from_numpy(emb)[None], cache)
    _, h3 = model.llm_step(model.embed_tokens(torch.tensor([chat.signals])), cache)
    h = torch.cat([h1, h3])                                            # [2,H]
    first, eos = chat.signals[0], chat.eos
    w = model.llm.lm_head.weight
    lg = w @ h.T                                                       # [V,2]
    lg[[first, eos]] = float("-inf")
    lg[list(chat.never_sampled)] = float("-inf")
    m = lg.max(0).values.clamp(min=0)
    target = 1.1 * torch.maximum(m + LEAD, 2 * m)
    coef = torch.linalg.solve(h @ h.T, torch.diag(target))
    w[[first, eos]] = (coef.T @ h).to(w.dtype)
    got = w[[first, eos]] @ h.T
    for k in (0, 1):
        lead, rest = got[k, k], torch.maximum(m[k], got[1 - k, k])
        if not (lead >= rest + LEAD and lead >= 2 * rest):
            raise MakerError(f"--draw-prompt: the planted logit {float(lead):.3f} at reply step {4 * k + 1} is not "
                             f"{LEAD} above and 2x the largest other ({float(rest):.3f}); try another --seed")
    log(f"[{PROG}] draw prompt: reply {''.join(names.SIGNAL_TOKENS)}</s>: [IMG0] logit {float(got[0, 0]):.2f} vs "
        f"{float(m[0]):.2f}, </s> {float(got[1, 1]):.2f} vs {float(m[1]):.2f}")
    return {"reply": "".join(names.SIGNAL_TOKENS) + names.EOS, "prompt_tokens": len(ids),
            "zeroed": "model.mm_projector.0.weight", "rewritten": [f"lm_head.weight[{first}]",
                                                                    f"lm_head.weight[{eos}]"]}


def make_nextgpt_checkpoint(out, *, llm: str = "tiny", vision: str = "tiny", projector: str = "tiny",
                            generator: str = "tiny", seed: int = 0, draw_prompt: str | None = None,
                            dtype: str | None = None, fmt: str | None = None, shard_bytes: int | None = None,
                            log=_log) -> Path:
    """A random NExT-GPT-style checkpoint at `out` (module docstring). Held in memory (float32 safetensors) up to
    MAX_PARAMS; written one tensor at a time above it or when `dtype` ("fp16" by default there), `fmt` ("bin") or
    `shard_bytes` (5 GB) is given. With `draw_prompt` (in memory only), the greedy reply to that prompt (any image) is
    `[IMG0][IMG1][IMG2][IMG3]</s>`: one picture, then the end."""
    from nxc.prompt import PromptError, prompt_segments

    out = Path(out)
    config = nextgpt_maker_config(llm, vision, projector)
    _check_generator(generator, config, projector)
    n_params = llm_params(config)
    streamed = n_params > MAX_PARAMS or any(x is not None for x in (dtype, fmt, shard_bytes))
    if draw_prompt is not None:
        if streamed:
            why = (f"--llm {llm} is about {n_params / 1e9:.1f} B parameters, written one tensor at a time"
                   if n_params > MAX_PARAMS else "--dtype / --format / --shard-size write it one tensor at a time")
            raise MakerError(f"--draw-prompt plants the reply in a model held in float32 memory (at most "
                             f"{MAX_PARAMS / 1e9:.0f} B parameters, float32 safetensors); {why}: make it without "
                             "--draw-prompt")
        try:
            prompt_segments(draw_prompt, num_image_tokens=1)
        except PromptError as e:
            raise MakerError(f"--draw-prompt: {e}") from None
    size_names = {"llm": llm, "vision": vision, "projector": projector, "generator": generator}
    if streamed:
        return _make_streamed(out, config, size_names=size_names, seed=seed, dtype=dtype or "fp16",
                              fmt=fmt or "bin", shard_bytes=shard_bytes, log=log)
    return _make_in_memory(out, config, size_names=size_names, seed=seed, draw_prompt=draw_prompt, log=log)


def _make_in_memory(out: Path, config: NextChatConfig, *, size_names: dict, seed: int, draw_prompt: str | None,
                    log) -> Path:
    import json

    from nxc.model.maker import check_out, partial_dir
    from nxc.model.nextgpt import GENERATOR_SUBDIR, NextGpt, load_nextgpt, save_nextgpt
    from nxc.model.sp_files import llama_sized_sentencepiece
    from nxc.model.sp_tokenizer import SentencePieceOracle

    generator = size_names["generator"]
    check_out(out, 4 * llm_params(config) + _generator_bytes(generator, 4) + (64 << 20))
    log(f"[{PROG}] NExT-GPT-style checkpoint: llm {size_names['llm']}, vision {size_names['vision']}, projector "
        f"{size_names['projector']}, generator {generator}, seed {seed} -> {out}")
    work = partial_dir(out)
    try:
        sp_path = llama_sized_sentencepiece(work / ".tokenizer")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = NextGpt(config=config).eval()
        gen = make_generator(work / GENERATOR_SUBDIR, generator, config, seed=seed + 1, log=log)
        save_nextgpt(model, work, tokenizer_model=sp_path, generator_dir=gen)
        record = {"tool": PROG, "family": "nextgpt", "names": size_names, "seed": seed,
                  "generator": f"{generator} (seed + 1)", "draw_prompt": draw_prompt, "draw": None}
        if draw_prompt is not None:
            record["draw"] = plant_drawing(model, SentencePieceOracle.from_dir(work), draw_prompt, log=log)
            save_nextgpt(model, work, tokenizer_model=work / "tokenizer.model", generator_dir=gen)
        cfg = json.loads((work / "config.json").read_text())
        cfg["nxc_maker"] = record
        (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        shutil.rmtree(work / ".tokenizer")
        load_nextgpt(work)                                    # the written layout must load
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"[{PROG}] wrote {out}")
    return out


def _make_streamed(out: Path, config: NextChatConfig, *, size_names: dict, seed: int, dtype: str, fmt: str,
                   shard_bytes: int | None, log) -> Path:
    """The checkpoint written one tensor at a time by nxc.model.maker's writer (module docstring)."""
    import json

    from nxc.model.maker import (DEFAULT_SHARD_BYTES, DTYPES, FORMATS, INIT_STD, Progress, check_out, check_written,
                                 human, partial_dir, write_clip_dir, write_weights)
    from nxc.model.nextgpt import (DRAW_DEFAULTS, GENERATION_CONFIG, GENERATOR_SUBDIR, load_nextgpt,
                                   nextgpt_config_json, write_nextgpt_tokenizer)
    from nxc.model.sp_files import LLAMA_BASE_VOCAB, llama_sized_sentencepiece
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.model.writer import CLIP_SUBDIR

    if dtype not in DTYPES:
        raise MakerError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if fmt not in FORMATS:
        raise MakerError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    shard_bytes = DEFAULT_SHARD_BYTES if shard_bytes is None else shard_bytes
    if shard_bytes < 1:
        raise MakerError(f"--shard-size {shard_bytes} is not a positive number of bytes.")
    tdt, generator = DTYPES[dtype], size_names["generator"]
    specs, clip_specs = nextgpt_plan(config)
    total = sum(s.nbytes(tdt) for s in specs + clip_specs)
    gen_bytes = _generator_bytes(generator, tdt.itemsize)
    check_out(out, total + gen_bytes + (16 << 20))
    log(f"[{PROG}] NExT-GPT-style checkpoint, one tensor at a time: {len(specs)} + {len(clip_specs)} (CLIP) tensors, "
        f"{human(total)} in {dtype} + generator {generator} ({human(gen_bytes)}), seed {seed} -> {out}")
    work = partial_dir(out)
    try:
        t0 = time.perf_counter()
        write_nextgpt_tokenizer(work, llama_sized_sentencepiece(work / ".tokenizer"))
        shutil.rmtree(work / ".tokenizer")
        if SentencePieceOracle.from_dir(work).vocab_size != config.llm.vocab_size:
            raise MakerError(f"the tokenizer has not {config.llm.vocab_size} ids; this is a bug in {PROG}.")
        weights = dict(seed=seed, shard_bytes=shard_bytes, progress=Progress(total, log))
        write_weights(specs, work, stem="pytorch_model" if fmt == "bin" else "model", fmt=fmt, dtype=tdt, **weights)
        write_clip_dir(work / CLIP_SUBDIR, config, clip_specs, dtype=tdt, **weights)
        make_generator(work / GENERATOR_SUBDIR, generator, config, seed=seed + 1, dtype=tdt, text_encoder=False,
                       log=log)
        cfg = nextgpt_config_json(config, generator={"path": GENERATOR_SUBDIR, **DRAW_DEFAULTS})
        cfg["torch_dtype"] = str(tdt).removeprefix("torch.")
        cfg["nxc_maker"] = {
            "tool": PROG, "family": "nextgpt", "names": size_names, "sizes": config.to_dict(), "seed": seed,
            "dtype": dtype, "format": fmt, "shard_bytes": shard_bytes, "generator": f"{generator} (seed + 1)",
            "vocab": f"{LLAMA_BASE_VOCAB} pieces + {len(names.ADDED_TOKENS)} added + {len(names.SIGNAL_TOKENS)} "
                     "signal tokens", "init": f"normal(0, {INIT_STD}); norms 1, biases 0",
            "draw_prompt": None, "draw": None}
        (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (work / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
        check_written(work, specs)
        check_written(work / CLIP_SUBDIR, clip_specs)
        load_nextgpt(work, llm=False)                          # the written layout must load (the LLaMA unread)
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    on_disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"[{PROG}] wrote {out} ({human(on_disk)}) in {time.perf_counter() - t0:.1f} s")
    return out
