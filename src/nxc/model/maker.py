"""nxc-make-checkpoint's work: a random-weight NExT-Chat in the official layout, made one tensor at a time (issue 17).

    registry names ─▶ NextChatConfig (LLaMA vocab always 32000 + 5 added = 32005)
        ─▶ NextChat and CLIPVisionModel built on the meta device: [(official name, shape, init)] in state-dict order,
           + each LLaMA layer's RoPE buffer `self_attn.rotary_emb.inv_freq` (the release's transformers 4.31 saved it)
        ─▶ shards planned from the byte sizes (a new shard when the next tensor would pass --shard-size)
        ─▶ per tensor: torch.Generator(sha256(seed, name)) ─▶ normal(0, std) in float32 chunks ─▶ dtype ─▶ shard
           (a full shard is written, torch.save zip or safetensors save_file, and dropped)
        ─▶ config.json (+ "nxc_maker"), generation_config.json, tokenizer files, clip/ (HF CLIPVisionModel directory)
        ─▶ [trigger prompt] streamed LLaMA forwards of the reply ─▶ lm_head's <at>, </s> rows rewritten
           (nxc.model.maker_trigger)
        ─▶ check: the shards hold exactly the planned names and shapes ─▶ rename .OUT.partial-<pid> to OUT

Initialisation (like HF's `_init_weights`): biases 0, LayerNorm / LayerNorm2d / RMSNorm weights 1, SAM's random
Fourier matrix normal(0, 1), every other tensor (Linear, Embedding, Conv, CLIP's class and position embeddings, SAM's
pos_embed and rel_pos) normal(0, 0.02); the RoPE buffers 1 / rope_theta^(arange(0, D, 2) / D), as transformers 4.31
computed them, in the dtype of the weights. Each tensor has its own generator seeded from (seed, official name), so the
values do not depend on the shard size, the format or the order of writing; --dtype only rounds them.

Memory: the model is never held. What is held is the shard being filled (--shard-size, 5 GB by default, as the
release's shards; the CLIP directory is sharded the same way), one tensor in the target dtype (a tensor larger than
the shard gets a shard of its own) and a 16 MB float32 chunk while it is drawn. The trigger step reads the written
shards in order (at most one mapped at a time), holds one LLaMA layer in float32 (0.8 GB at 7B) and, while
rewriting it, the shard that holds lm_head.

config.json carries an "nxc_maker" record (registry names, sizes, seed, dtype, format, shard size, trigger) that the
loaders ignore.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, ConfigError, NextChatConfig
from nxc.model.layout import rope_buffer_name, rope_inv_freq
# PROG, MakerError and dump_shard live in nxc.model.maker_base (maker_trigger needs them too); callers import them here
from nxc.model.maker_base import PROG, MakerError, dump_shard, pick_sizes
from nxc.model.maker_trigger import plant_trigger
from nxc.model.sp_files import LLAMA_BASE_VOCAB

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("bin", "safetensors")
VOCAB_SIZE = LLAMA_BASE_VOCAB + 5            # 32000 sentencepiece pieces + NExT-Chat's 5 added tokens
DEFAULT_SHARD_BYTES = 5_000_000_000
INIT_STD = 0.02
_STACKS = ("model", "encoder", "image_encoder", "transformer")   # parents of the layer stacks (progress lines)
_CHUNK = 1 << 22                             # float32 elements drawn at a time (16 MB)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class TensorSpec:
    name: str                  # official name (checkpoint) or HF name (CLIP directory)
    shape: tuple[int, ...]
    init: str                  # "normal", "ones", "zeros" or "rope" (a layer's saved RoPE inv_freq buffer)
    std: float = 0.0
    theta: float = 0.0         # "rope": rope_theta

    def nbytes(self, dtype: torch.dtype) -> int:
        return math.prod(self.shape) * dtype.itemsize


# -- sizes and the plan ------------------------------------------------------------------------------------------
def maker_config(llm: str, vision: str, sam: str) -> NextChatConfig:
    """Registry names -> the NextChatConfig to make; the LLaMA vocab is always 32005 (the registry's is ignored)."""
    llm_sizes, vision_sizes, sam_sizes = pick_sizes(("--llm", LLAMA_SIZES, llm), ("--vision", VISION_SIZES, vision),
                                                    ("--sam", SAM_SIZES, sam))
    return NextChatConfig(llm=replace(llm_sizes, vocab_size=VOCAB_SIZE), vision=vision_sizes, sam=sam_sizes,
                          mm_hidden_size=vision_sizes.hidden_size)


def _init_of(module: torch.nn.Module, local: str) -> tuple[str, float]:
    if local == "bias":
        return "zeros", 0.0
    if local == "weight" and "Norm" in type(module).__name__:      # LayerNorm, LayerNorm2d, LlamaRMSNorm
        return "ones", 0.0
    if local == "positional_encoding_gaussian_matrix":               # SAM: scale * randn, scale 1
        return "normal", 1.0
    return "normal", INIT_STD


def module_specs(module: torch.nn.Module, rename) -> list[TensorSpec]:
    """TensorSpecs of a meta-device module's state dict, in its order; rename(key) -> name or None (skip)."""
    owner = {}
    for mod_name, mod in module.named_modules():
        for local, _ in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]:
            owner[f"{mod_name}.{local}" if mod_name else local] = (mod, local)
    out = []
    for key, t in module.state_dict(keep_vars=True).items():
        name = rename(key)
        if name is not None:
            init, std = _init_of(*owner[key])
            out.append(TensorSpec(name=name, shape=tuple(t.shape), init=init, std=std))
    return out


def checkpoint_plan(config: NextChatConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(checkpoint tensors under official names, CLIP directory tensors under HF's `vision_model.` names), built
    from modules on the meta device: no weight is allocated. The checkpoint's names and shapes are
    `writer.official_state_dict(NextChat(config))`'s and, after each layer's o_proj, the layer's RoPE buffer
    `model.layers.{i}.self_attn.rotary_emb.inv_freq` [D/2], as the release's transformers (4.31) saved it."""
    from nxc.model.checkpoint import official_key
    from nxc.model.nextchat import NextChat

    with torch.device("meta"):
        model = NextChat(config=config)
    ckpt = []
    for s in module_specs(model, lambda k: None if k.startswith("vision_tower.") else official_key(k)):
        ckpt.append(s)
        if s.name.endswith(".self_attn.o_proj.weight"):
            i = int(s.name.split(".")[2])
            ckpt.append(TensorSpec(name=rope_buffer_name(i), shape=(config.llm.head_dim // 2,), init="rope",
                                   theta=config.llm.rope_theta))
    return ckpt, module_specs(model.vision_tower, lambda k: "vision_model." + k)


def projector_out_weight(specs: list[TensorSpec]) -> str:
    """Official name of the projector's last Linear weight (`model.mm_projector.{last}.weight`)."""
    idx = [int(s.name.split(".")[2]) for s in specs
           if s.name.startswith("model.mm_projector.") and s.name.endswith(".weight")]
    return f"model.mm_projector.{max(idx)}.weight"


def tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{PROG}:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_tensor(spec: TensorSpec, *, seed: int, dtype: torch.dtype) -> torch.Tensor:
    """One tensor: zeros, ones, RoPE frequencies or normal(0, std) drawn in float32 from its own generator, then cast
    to `dtype`."""
    if spec.init == "rope":
        return rope_inv_freq(spec.theta, 2 * spec.shape[0]).to(dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    g = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    out = torch.empty(spec.shape, dtype=dtype)
    flat = out.view(-1)
    for i in range(0, flat.numel(), _CHUNK):
        n = min(_CHUNK, flat.numel() - i)
        flat[i:i + n] = torch.empty(n).normal_(0.0, spec.std, generator=g)
    return out


def plan_shards(specs: list[TensorSpec], dtype: torch.dtype, shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of about `shard_bytes` (a tensor larger than that gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        n = s.nbytes(dtype)
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += n
    return shards


def tensor_group(name: str) -> str:
    """The progress group of a tensor: its layer or block (`model.layers.3`), else its module."""
    segs = name.split(".")
    for i in range(1, len(segs) - 1):     # LLaMA, CLIP and SAM encoder layers, SAM's two-way transformer layers
        if segs[i] in ("layers", "blocks") and segs[i + 1].isdigit() and segs[i - 1] in _STACKS:
            return ".".join(segs[:i + 2])
    depth = {"model": 2, "sam": 3, "vision_model": 2}.get(segs[0], 1)
    return ".".join(segs[:min(depth, len(segs) - 1)])


def human(nbytes: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= div:
            return f"{nbytes / div:.2f} {unit}"
    return f"{int(nbytes)} B"


# -- writing -----------------------------------------------------------------------------------------------------
class Progress:
    """One stderr line per tensor group (`[label]group`): its size, bytes made of the total, on disk, rate, ETA."""

    def __init__(self, total: int, log):
        self.total, self.log, self.done, self.on_disk, self.t0 = total, log, 0, 0, time.perf_counter()
        self.group, self.count, self.nbytes = "", 0, 0

    def enter(self, group: str) -> None:
        if group != self.group:
            self.flush()
            self.group = group

    def add(self, nbytes: int) -> None:
        self.count, self.nbytes, self.done = self.count + 1, self.nbytes + nbytes, self.done + nbytes

    def flush(self) -> None:
        if self.count:
            rate = self.done / max(time.perf_counter() - self.t0, 1e-6)
            self.log(f"[{PROG}] {self.group}: {self.count} tensors, {human(self.nbytes)} | {human(self.done)} of "
                     f"{human(self.total)} made ({human(self.on_disk)} on disk), {human(rate)}/s, "
                     f"ETA {(self.total - self.done) / rate:.0f} s")
        self.count = self.nbytes = 0


def write_weights(specs: list[TensorSpec], out: Path, *, stem: str, fmt: str, dtype: torch.dtype, seed: int,
                  shard_bytes: int, progress: Progress, label: str = "") -> dict[str, str]:
    """Make and write `specs` as `<stem>.<ext>`, or as `<stem>-0000i-of-0000n.<ext>` shards with an index when they
    pass `shard_bytes`, holding one shard at a time. Returns {name: file name}."""
    ext = "safetensors" if fmt == "safetensors" else "bin"
    shards = plan_shards(specs, dtype, shard_bytes)
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"{stem}.{ext}" if n == 1 else f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}"
        part = {}
        for s in shard:
            progress.enter(label + tensor_group(s.name))
            part[s.name] = make_tensor(s, seed=seed, dtype=dtype)
            progress.add(s.nbytes(dtype))
        dump_shard(part, out / fname, fmt)
        del part
        size = sum(s.nbytes(dtype) for s in shard)
        progress.on_disk += size
        weight_map.update({s.name: fname for s in shard})
        if n > 1:
            progress.log(f"[{PROG}] wrote {label}{fname} ({human(size)})")
    progress.flush()
    if n > 1:
        (out / f"{stem}.{ext}.index.json").write_text(json.dumps(
            {"metadata": {"total_size": sum(s.nbytes(dtype) for s in specs)}, "weight_map": weight_map}, indent=2))
    return weight_map


# -- the directory -----------------------------------------------------------------------------------------------
def check_out(out: Path, need_bytes: int) -> None:
    """Refuse an OUT that exists and is not an empty directory, or a disk without room for `need_bytes`."""
    if out.exists() and not out.is_dir():
        raise MakerError(f"{out} exists and is not a directory; choose a new directory for the checkpoint.")
    if out.is_dir() and any(out.iterdir()):
        raise MakerError(f"{out} is not empty; choose a new directory (or empty this one) for the checkpoint.")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need_bytes:
        raise MakerError(f"not enough free disk space at {probe}: the checkpoint needs about {human(need_bytes)}, "
                         f"{human(free)} is free. Free space, choose another place, or make a smaller size.")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:       # another user's process
        pass
    return True


def partial_dir(out: Path) -> Path:
    """`.<OUT>.partial-<pid>` beside OUT, after removing those of dead makers."""
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(f".{out.name}.partial-*"):
        pid = stale.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    work = parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    return work


def write_clip_dir(clip_dir: Path, config: NextChatConfig, specs: list[TensorSpec], *, dtype: torch.dtype,
                   **weights) -> None:
    """An HF CLIPVisionModel directory: config.json, preprocessor_config.json (openai/clip-vit-large-patch14-336's,
    at this tower's image size) and the weights under `vision_model.*` names as (sharded) model.safetensors."""
    from nxc.model.nextchat import clip_config
    from nxc.model.processing import CLIP_MEAN, CLIP_STD

    clip_dir.mkdir()
    cfg = clip_config(config.vision)
    cfg.architectures = ["CLIPVisionModel"]
    cfg.dtype = dtype
    cfg.save_pretrained(clip_dir)
    size = config.vision.image_size
    (clip_dir / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": size, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
        "resample": 3, "size": size}, indent=2) + "\n")
    write_weights(specs, clip_dir, stem="model", fmt="safetensors", dtype=dtype, label="clip/", **weights)


def check_written(path: Path, specs: list[TensorSpec]) -> None:
    from nxc.model.lazy import LazyCheckpoint

    src = LazyCheckpoint(path)
    got = {k: src.shape(k) for k in src.keys()}
    src.close()
    want = {s.name: s.shape for s in specs}
    if got != want:
        bad = sorted(set(got.items()) ^ set(want.items()))[:3]
        raise MakerError(f"{path}: the written tensors differ from the plan ({bad}); this is a bug in {PROG}.")


def make_checkpoint(out, *, config: NextChatConfig, dtype: str = "fp16", fmt: str = "bin",
                    shard_bytes: int = DEFAULT_SHARD_BYTES, seed: int = 0, trigger_prompt: str | None = None,
                    size_names: dict | None = None, extras=None, extra_bytes: int = 0, log=_log) -> Path:
    """Write a random NExT-Chat of `config` to `out` in the official layout (see the module docstring); `size_names`:
    the registry names, recorded in config.json's "nxc_maker" with the sizes, seed, dtype and trigger.
    With `trigger_prompt`: the greedy reply to that prompt (NExT-Chat template, any image, no region boxes) is
    `<at> <boxes></s>`, so the grounded path (box, mask) runs (see `plant_trigger`). `extras(work) -> dict`: more
    files written into the checkpoint before it is renamed into place (a VITRON layout's generator/ and modules.json,
    `extra_bytes` of them), its record kept in "nxc_maker". Returns `out` as a Path."""
    from nxc.model.sp_files import llama_sized_sentencepiece, write_tokenizer_files
    from nxc.model.sp_tokenizer import SentencePieceOracle
    from nxc.model.writer import CLIP_SUBDIR, nextchat_config_json
    from nxc.prompt import PromptError, prompt_segments

    out = Path(out)
    if dtype not in DTYPES:
        raise MakerError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}.")
    if fmt not in FORMATS:
        raise MakerError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}.")
    if shard_bytes < 1:
        raise MakerError(f"--shard-size {shard_bytes} is not a positive number of bytes.")
    if config.llm.vocab_size != VOCAB_SIZE:
        raise ConfigError(f"vocab_size is {config.llm.vocab_size}; a made checkpoint has LLaMA's {VOCAB_SIZE}.")
    if trigger_prompt is not None:
        try:
            prompt_segments(trigger_prompt, num_image_tokens=config.num_image_tokens)
        except PromptError as e:
            raise MakerError(f"--trigger-prompt: {e}") from None
    tdt = DTYPES[dtype]
    specs, clip_specs = checkpoint_plan(config)
    total = sum(s.nbytes(tdt) for s in specs + clip_specs)
    largest = max(sum(s.nbytes(tdt) for s in sh) for sh in plan_shards(specs, tdt, shard_bytes))
    check_out(out, total + (largest if trigger_prompt is not None else 0) + (16 << 20)   # + the rewritten shard
              + extra_bytes)
    zeroed = projector_out_weight(specs) if trigger_prompt is not None else None
    log(f"[{PROG}] {len(specs)} + {len(clip_specs)} (CLIP) tensors, {human(total)} in {dtype}, seed {seed} -> {out}")
    work = partial_dir(out)
    try:
        t0 = time.perf_counter()
        tok = llama_sized_sentencepiece(work / ".tokenizer")
        write_tokenizer_files(work, tok)
        shutil.rmtree(work / ".tokenizer")
        if SentencePieceOracle.from_dir(work).vocab_size != VOCAB_SIZE:
            raise MakerError(f"the tokenizer has not {VOCAB_SIZE} ids; this is a bug in {PROG}.")
        progress = Progress(total, log)
        weights = dict(seed=seed, shard_bytes=shard_bytes, progress=progress)
        write_weights([replace(s, init="zeros") if s.name == zeroed else s for s in specs], work,
                      stem="pytorch_model" if fmt == "bin" else "model", fmt=fmt, dtype=tdt, **weights)
        write_clip_dir(work / CLIP_SUBDIR, config, clip_specs, dtype=tdt, **weights)
        record = {"tool": PROG, "names": size_names, "sizes": config.to_dict(), "seed": seed, "dtype": dtype,
                  "format": fmt, "shard_bytes": shard_bytes, "vocab": f"{LLAMA_BASE_VOCAB} pieces + 5 added",
                  "init": f"normal(0, {INIT_STD}); norms 1, biases 0, SAM Fourier matrix normal(0, 1)",
                  "trigger_prompt": trigger_prompt, "trigger": None}
        if trigger_prompt is not None:
            record["trigger"] = plant_trigger(work, config, trigger_prompt, zeroed=zeroed, fmt=fmt, dtype=tdt, log=log)
        if extras is not None:
            record["extras"] = extras(work)
        cfg = nextchat_config_json(config, clip_dir=CLIP_SUBDIR)
        cfg["torch_dtype"] = str(tdt).removeprefix("torch.")
        cfg["nxc_maker"] = record
        (work / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (work / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2) + "\n")
        check_written(work, specs)
        check_written(work / CLIP_SUBDIR, clip_specs)
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    log(f"[{PROG}] wrote {out} ({human(total)}) in {time.perf_counter() - t0:.1f} s")
    return out
