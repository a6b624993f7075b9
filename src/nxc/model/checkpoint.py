"""Read and write NExT-Chat checkpoints in the official layout (reference §6).

A checkpoint directory holds config.json (LLaMA fields + nextchat fields), generation_config.json,
weights as `pytorch_model*.bin` or `*.safetensors` (one file, or shards with or without an index),
and the LLaMA sentencepiece tokenizer files with the 5 added tokens. CLIP comes from a separate
directory (HF CLIPVisionModel layout), with its image preprocessing from that directory's preprocessor_config.json
when there is one (as the original's CLIPImageProcessor); SAM from the checkpoint's `sam.model.*` keys or a
separate file.

Weights are read with `torch.load(weights_only=True)` or safetensors: a pickle that carries code is refused.
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nxc.config import ConfigError, NextChatConfig, llama_sizes_from_config_json
# CheckpointError and weight_files live in nxc.model.layout (lazy.py needs them too); callers import them here
from nxc.model.layout import CheckpointError, check_rope_buffer, is_rope_buffer, weight_files
from nxc.model.lazy import LazyCheckpoint
from nxc.model.nextchat import NextChat, vision_sizes_from_clip
from nxc.model.processing import CLIP_MEAN, CLIP_STD, ClipPreprocess
from nxc.model.sam import infer_sam_sizes

if TYPE_CHECKING:
    from nxc.config import LlamaSizes
    from nxc.model.sp_tokenizer import SentencePieceOracle


# official prefix -> internal module prefix, first match wins
_KEY_MAP = (
    ("model.mm_projector.", "mm_projector."),
    ("sam.model.", "sam."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
    ("loc_encoder.", "loc_encoder."),
    ("loc_decoder.", "loc_decoder."),
    ("seg_prompt_mlp.", "seg_prompt_mlp."),
    ("region_encoder.", "region_encoder."),
)
# official keys that carry nothing the reference needs: CLIP comes from its own directory (§6.3),
# RoPE inverse frequencies (transformers <= 4.31 saved them) are recomputed from rope_theta, after
# load_nextchat checked that they agree (nxc.model.layout).
_IGNORED = ("model.vision_tower.",)


def internal_key(key: str) -> str | None:
    if key.startswith(_IGNORED) or is_rope_buffer(key):
        return None
    for official, internal in _KEY_MAP:
        if key.startswith(official):
            return internal + key[len(official):]
    return key


def official_key(key: str) -> str:
    for official, internal in _KEY_MAP:
        if key.startswith(internal):
            return official + key[len(internal):]
    return key


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing. Re-download or re-copy the checkpoint directory.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a damaged header
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} was refused: it is a pickle that holds more than tensors (it could run code when loaded). "
            f"nxc only reads plain weight files. Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch weight file ({str(e).splitlines()[0]}); "
                              "it may be truncated.") from None


def load_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in weight_files(ckpt):
        sd.update(_load_file(f))
    return sd


def load_sam_file(path: Path) -> dict[str, torch.Tensor]:
    """Meta's SAM checkpoint (keys image_encoder.* ...) or one with the `sam.model.` prefix."""
    sd = _load_file(Path(path))
    return {k.removeprefix("sam.model."): v for k, v in sd.items()}


def read_config(ckpt: Path) -> dict:
    path = ckpt / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: {ckpt} is not a NExT-Chat checkpoint directory.")
    return json.loads(path.read_text())


def resolve_clip_dir(ckpt: Path, cfg: dict, clip_dir: str | Path | None) -> Path:
    if clip_dir is None:
        tower = cfg.get("mm_vision_tower")
        if not tower:
            raise CheckpointError("no CLIP directory: pass --clip DIR (a local copy of "
                                  "openai/clip-vit-large-patch14-336 for the released model).")
        clip_dir = Path(tower) if Path(tower).is_absolute() else ckpt / tower
    clip_dir = Path(clip_dir)
    if not (clip_dir / "config.json").is_file():
        raise CheckpointError(f"CLIP directory {clip_dir} has no config.json: pass --clip with a local copy of "
                              "the CLIP vision model the checkpoint was trained with.")
    return clip_dir


PREPROCESSOR_CONFIG = "preprocessor_config.json"
# PIL's integer filter codes, as HF image processors store them (0 = nearest is refused: clip_pixels pads and
# resizes with Pillow's convolution filters only)
_PIL_RESAMPLE = {1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def _edge(cfg: dict, key: str, bad) -> int | None:
    """HF's size / crop_size: an int, {"shortest_edge": n} or {"height": n, "width": n} -> n (None if absent)."""
    v = cfg.get(key)
    if v is None:
        return None
    if isinstance(v, dict):
        if "shortest_edge" in v:
            v = v["shortest_edge"]
        elif "height" in v and "width" in v and v["height"] == v["width"]:
            v = v["height"]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise bad(key, v, 'a positive int, {"shortest_edge": n} or a square {"height": n, "width": n}')
    return v


def _triple(cfg: dict, key: str, default, bad, positive: bool = False) -> tuple[float, float, float]:
    v = cfg.get(key, default)
    v = [v] * 3 if isinstance(v, (int, float)) and not isinstance(v, bool) else v
    ok = (isinstance(v, (list, tuple)) and len(v) == 3
          and all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
          and (not positive or all(x > 0 for x in v)))
    if not ok:
        raise bad(key, v, f"3 finite numbers{' > 0' if positive else ''} (one per RGB channel)")
    return tuple(float(x) for x in v)


def read_clip_preprocess(clip_dir: Path, image_size: int) -> ClipPreprocess:
    """The CLIP directory's preprocessor_config.json (HF CLIPImageProcessor: image_mean, image_std, size
    {"shortest_edge"}, crop_size, resample as a PIL code) -> ClipPreprocess; the standard CLIP values when the file
    is absent. The image is square when CLIP sees it, so resize-then-crop is one resize to `image_size` (the
    tower's): a config that would crop, or skip a step nxc always does, is refused rather than followed wrongly."""
    path = Path(clip_dir) / PREPROCESSOR_CONFIG
    if not path.is_file():
        return ClipPreprocess(size=image_size)

    def bad(key, value, expected):
        return CheckpointError(f"{path}: {key} is {value!r}; expected {expected}. Fix the file or delete it to use "
                               "the standard CLIP preprocessing.")
    try:
        cfg = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); fix it or delete it to use the standard CLIP "
                              "preprocessing.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} holds a {type(cfg).__name__}, expected a JSON object.")
    for key in ("do_resize", "do_rescale", "do_normalize"):
        if cfg.get(key, True) is not True:
            raise bad(key, cfg[key], "true (nxc always resizes, scales by 1/255 and normalises)")
    factor = cfg.get("rescale_factor", 1 / 255)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or abs(factor - 1 / 255) > 1e-9:
        raise bad("rescale_factor", factor, "1/255 (0.00392156862745098)")
    resample = cfg.get("resample", 3)
    if isinstance(resample, bool) or resample not in _PIL_RESAMPLE:
        codes = ", ".join(f"{c} ({n})" for c, n in _PIL_RESAMPLE.items())
        raise bad("resample", resample, f"a PIL filter code: {codes}")
    edge, crop = _edge(cfg, "size", bad), _edge(cfg, "crop_size", bad)
    for key, v in (("size", edge), ("crop_size", crop if cfg.get("do_center_crop", True) else None)):
        if v is not None and v != image_size:
            raise bad(key, cfg[key], f"{image_size}, the CLIP tower's image_size (config.json)")
    return ClipPreprocess(size=image_size, mean=_triple(cfg, "image_mean", CLIP_MEAN, bad),
                          std=_triple(cfg, "image_std", CLIP_STD, bad, positive=True), resample=_PIL_RESAMPLE[resample])


def read_config_and_tokenizer(ckpt: Path) -> tuple[dict, "LlamaSizes", "SentencePieceOracle"]:
    """(config.json, its LLaMA sizes, the tokenizer) of a checkpoint, checked to belong together."""
    from nxc.model.sp_tokenizer import SentencePieceOracle
    cfg = read_config(ckpt)
    llm_sizes = llama_sizes_from_config_json(cfg, source=str(ckpt / "config.json"))
    tokenizer = SentencePieceOracle.from_dir(ckpt)
    if tokenizer.vocab_size != llm_sizes.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.json says vocab_size "
                              f"{llm_sizes.vocab_size}: the tokenizer files do not belong to these weights.")
    return cfg, llm_sizes, tokenizer


def load_nextchat(ckpt: str | Path, *, clip_dir: str | Path | None = None, sam_file: str | Path | None = None,
                  llm: bool = True) -> tuple[NextChat, "SentencePieceOracle"]:
    """Build the reference model and its tokenizer from an official-layout checkpoint.

    llm=False (the export): the whole model is built on the meta device (names and shapes, checked against the
    checkpoint's, no storage); the LLaMA's tensors are never read here, the other modules are made real per graph
    by `model.parts` (nxc.model.parts.LazyParts), reading tensors one at a time (nxc.model.lazy)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ckpt = Path(ckpt)
    cfg, llm_sizes, tokenizer = read_config_and_tokenizer(ckpt)
    clip_path = resolve_clip_dir(ckpt, cfg, clip_dir)
    clip = (CLIPVisionModel.from_pretrained(str(clip_path), local_files_only=True, attn_implementation="eager")
            if llm else None)
    clip_cfg = clip.config if llm else CLIPVisionConfig.from_pretrained(str(clip_path), local_files_only=True)
    clip_preprocess = read_clip_preprocess(clip_path, int(clip_cfg.image_size))
    if llm:
        sd = load_state_dict(ckpt)
        shapes = None
    else:
        lazy = LazyCheckpoint(ckpt)
        sd = {k: (lambda k=k: lazy.get(k)) for k in lazy.keys()}     # read when loaded, one at a time
        shapes = {k: lazy.shape(k) for k in lazy.keys()}
    for k in [k for k in sd if is_rope_buffer(k)]:               # not weights: checked, then skipped
        check_rope_buffer(k, sd[k] if llm else sd[k](), llm_sizes)
    sam_sd = {k[len("sam.model."):]: v for k, v in sd.items() if k.startswith("sam.model.")}
    if sam_file is not None:   # like the original: the separate file first, then the checkpoint's tensors
        extra = load_sam_file(Path(sam_file))
        sam_sd = {**(extra if llm else {k: (lambda v=v: v) for k, v in extra.items()}), **sam_sd}
    if not sam_sd:
        raise CheckpointError(f"no SAM weights: {ckpt} has no sam.model.* tensors; pass --sam FILE "
                              "(e.g. sam_vit_h_4b8939.pth).")
    sam_shapes = None if llm else {k: tuple(v().shape) for k, v in sam_sd.items()}     # mapped, not read
    config = NextChatConfig(llm=llm_sizes, vision=vision_sizes_from_clip(clip_cfg),
                            sam=infer_sam_sizes(sam_sd if llm else {k: _Shaped(s) for k, s in sam_shapes.items()}),
                            mm_hidden_size=int(cfg["mm_hidden_size"]), mm_depth=int(cfg["mm_depth"]),
                            mm_vision_select_layer=int(cfg["mm_vision_select_layer"]),
                            mm_use_im_start_end=bool(cfg["mm_use_im_start_end"]),
                            region_encoder=any(k.startswith("region_encoder.") for k in sd))
    if config.mm_hidden_size != config.vision.hidden_size:
        raise ConfigError(f"mm_hidden_size is {config.mm_hidden_size} but the CLIP tower's width is "
                          f"{config.vision.hidden_size}: the CLIP directory does not match this checkpoint.")
    model = NextChat(config=config, llm_device=None if llm else "meta", parts_device=None if llm else "meta")
    if llm:
        model.vision_tower.load_state_dict(clip.state_dict())
    del clip
    mapped = {internal_key(k): v for k, v in sd.items() if not k.startswith("sam.model.")}
    mapped.pop(None, None)
    mapped.update({"sam." + k: v for k, v in sam_sd.items()})
    if shapes is not None:
        shapes = {internal_key(k): s for k, s in shapes.items() if not k.startswith("sam.model.")}
        shapes.update({"sam." + k: s for k, s in sam_shapes.items()})
    _load_strict(model, mapped, ckpt, shapes=shapes)
    if not llm:
        from nxc.model.parts import LazyParts
        model.parts = LazyParts(model, {k: v for k, v in mapped.items() if not k.startswith("llm.")}, clip_path)
    model.clip_preprocess = clip_preprocess      # read by processing.clip_preprocess_of
    model.eval()
    return model, tokenizer


class _Shaped:
    """A tensor's shape without its data (infer_sam_sizes reads only shapes)."""

    def __init__(self, shape):
        self.shape = shape


def _load_strict(model: NextChat, sd: dict, ckpt: Path, *, shapes: dict | None = None) -> None:
    """Every weight present, none unexpected, every shape right; then load. With `shapes` (a lazy load) the values of
    `sd` are callables read one at a time, and the LLaMA's (on the meta device) are checked but not read."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_tower.")}
    missing = [k for k in own if k not in sd]
    if missing:
        raise CheckpointError(f"{ckpt}: weight {official_key(missing[0])} is missing ({len(missing)} missing in all). "
                              "The checkpoint is incomplete or is not NExT-Chat.")
    unexpected = [k for k in sd if k not in own]
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected weight {official_key(unexpected[0])} "
                              f"({len(unexpected)} in all); the config does not describe these weights.")
    for k, v in own.items():
        got = shapes[k] if shapes is not None else tuple(sd[k].shape)
        if tuple(got) != tuple(v.shape):
            raise CheckpointError(f"{ckpt}: weight {official_key(k)} has shape {tuple(got)}, the config "
                                  f"implies {tuple(v.shape)}. config.json and the weights disagree.")
    if shapes is None:
        model.load_state_dict({**sd, **{k: v for k, v in model.state_dict().items()
                                        if k.startswith("vision_tower.")}})
        return
    with torch.no_grad():
        for k, p in own.items():
            if not k.startswith("llm.") and p.device.type != "meta":
                p.copy_(sd[k]().to(p.dtype))
