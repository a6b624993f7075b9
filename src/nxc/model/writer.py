"""Write a NExT-Chat checkpoint in the official layout (reference §6.5), and make tiny ones for tests.

`make_tiny_checkpoint(dir, seed)` gives a few-MB NExT-Chat with random weights, a real LLaMA-style
sentencepiece tokenizer (trained on a generated corpus) with the 5 added tokens, a CLIP directory
at `dir/clip` and SAM inside the checkpoint as `sam.model.*`.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, NextChatConfig
from nxc.model.checkpoint import official_key
from nxc.model.nextchat import NextChat

CLIP_SUBDIR = "clip"


def nextchat_config_json(config: NextChatConfig, *, clip_dir: str) -> dict:
    llm = config.llm
    return {
        "architectures": ["NextChatForSegLM"], "model_type": "nextchat",
        "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads, "vocab_size": llm.vocab_size, "rms_norm_eps": llm.rms_norm_eps,
        "rope_theta": llm.rope_theta, "max_position_embeddings": llm.max_position_embeddings,
        "hidden_act": "silu", "initializer_range": 0.02, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32", "use_cache": False,
        "use_mm_proj": True, "mm_hidden_size": config.mm_hidden_size, "mm_depth": config.mm_depth,
        "mm_vision_select_layer": config.mm_vision_select_layer,
        "mm_use_im_start_end": config.mm_use_im_start_end, "mm_vision_tower": clip_dir, "sam_path": None,
    }


def official_state_dict(model: NextChat) -> dict[str, torch.Tensor]:
    """The model's weights under official key names (CLIP excluded: it lives in its own directory)."""
    return {official_key(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if not k.startswith("vision_tower.")}


def save_nextchat(model: NextChat, out_dir: str | Path, *, tokenizer_model: str | Path,
                  safetensors: bool = False, shard_bytes: int | None = None, clip_dir: str | None = None) -> Path:
    """Write `model` to `out_dir` in the official layout. CLIP goes to `out_dir/clip` unless `clip_dir` is given."""
    from nxc.model.sp_files import write_tokenizer_files

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if clip_dir is None:
        model.vision_tower.save_pretrained(out / CLIP_SUBDIR, safe_serialization=True)
        clip_dir = CLIP_SUBDIR
    (out / "config.json").write_text(json.dumps(nextchat_config_json(model.config, clip_dir=clip_dir), indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "do_sample": False}, indent=2))
    write_tokenizer_files(out, Path(tokenizer_model))
    _write_weights(official_state_dict(model), out, safetensors=safetensors, shard_bytes=shard_bytes)
    return out


def _write_weights(sd: dict[str, torch.Tensor], out: Path, *, safetensors: bool, shard_bytes: int | None) -> None:
    ext = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"

    def dump(part: dict, path: Path) -> None:
        if safetensors:
            from safetensors.torch import save_file
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)

    if not shard_bytes:
        dump(sd, out / f"{stem}.{ext}")
        return
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    weight_map = {}
    for i, part in enumerate(shards):
        name = f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}"
        dump(part, out / name)
        weight_map.update({k: name for k in part})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out / f"{stem}.{ext}.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def tiny_config(vocab_size: int) -> NextChatConfig:
    vision = VISION_SIZES["tiny"]
    return NextChatConfig(llm=replace(LLAMA_SIZES["tiny"], vocab_size=vocab_size), vision=vision,
                          sam=SAM_SIZES["tiny"], mm_hidden_size=vision.hidden_size)


def make_tiny_checkpoint(out_dir: str | Path, seed: int = 0, *, config: NextChatConfig | None = None,
                         safetensors: bool = False, shard_bytes: int | None = None,
                         region_encoder: bool = False) -> Path:
    """A tiny random NExT-Chat in the official layout (region_encoder: with VITRON's region extractor). Same seed
    -> same weights and tokenizer."""
    from nxc.model.sp_files import train_tiny_sentencepiece
    from nxc.model.sp_tokenizer import SentencePieceOracle

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / ".tokenizer-train"
    sp_path = train_tiny_sentencepiece(work, seed)
    import sentencepiece as spm
    base = spm.SentencePieceProcessor(model_file=str(sp_path)).get_piece_size()
    config = config or replace(tiny_config(base + 5), region_encoder=region_encoder)
    torch.manual_seed(seed)
    model = NextChat(config=config).eval()
    save_nextchat(model, out, tokenizer_model=sp_path, safetensors=safetensors, shard_bytes=shard_bytes)
    shutil.rmtree(work, ignore_errors=True)
    SentencePieceOracle.from_dir(out)  # the written layout must load
    return out
