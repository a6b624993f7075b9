"""What every reader of an official-layout checkpoint shares: its error, its weight files, and the tensors in it
that are not weights (the whole-file reader nxc.model.checkpoint and the one-tensor reader nxc.model.lazy both
import this module, and it imports neither).

RoPE buffers: transformers <= 4.31 (the version NExT-Chat's own code pins, and 2023-era LLaMA releases) saved each
layer's rotary inverse frequencies, `model.layers.{i}.self_attn.rotary_emb.inv_freq` [D/2], in the weights' dtype.
nxc computes RoPE from config.json (rope_theta, head_dim D), so such a buffer is checked to agree with
1 / theta^(arange(0, D, 2) / D) and then skipped; one that does not agree is refused, named.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from nxc.config import LlamaSizes

ROPE_BUFFER_SUFFIX = ".rotary_emb.inv_freq"
ROPE_RTOL = 2.0 ** -7          # bf16's machine epsilon
ROPE_ATOL = 2.0 ** -24         # fp16's smallest subnormal


class CheckpointError(ValueError):
    """A checkpoint file is missing, unsafe or does not match the model: the message names it."""


def weight_files(ckpt: Path) -> list[Path]:
    """The weight files of a checkpoint directory, checked to exist."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = ckpt / index_name
        if index.is_file():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [f for f in files if not (ckpt / f).is_file()]
            if missing:
                raise CheckpointError(f"{index} lists shard {missing[0]} but {ckpt / missing[0]} does not exist "
                                      f"({len(missing)} of {len(files)} shards missing). Copy all shards.")
            return [ckpt / f for f in files]
    for pattern in ("model.safetensors", "pytorch_model.bin", "model-*.safetensors", "pytorch_model-*.bin"):
        found = sorted(ckpt.glob(pattern))
        if found:
            return found
    raise CheckpointError(f"no weights in {ckpt}: expected pytorch_model*.bin or *.safetensors "
                          "(with or without an index file).")


def rope_buffer_name(i: int) -> str:
    """Official name of layer i's saved RoPE buffer, as transformers <= 4.31 wrote it."""
    return f"model.layers.{i}.self_attn{ROPE_BUFFER_SUFFIX}"


def is_rope_buffer(key: str) -> bool:
    """An official name of a saved RoPE buffer (not a weight)."""
    return key.endswith(ROPE_BUFFER_SUFFIX)


def rope_inv_freq(theta: float, head_dim: int) -> "torch.Tensor":
    """[D/2] float32: 1 / theta^(arange(0, D, 2) / D), the frequencies the llm graph and transformers use."""
    import torch
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def check_rope_buffer(key: str, value: "torch.Tensor", sizes: "LlamaSizes") -> None:
    """Refuse a saved inv_freq buffer that is not the RoPE config.json implies. It may carry its dtype's rounding
    (saved in fp16 or bf16, and readers hand it on as float32): allowed, one bf16 unit in the last place relative
    (7.8e-3; a wrong rope_theta moves the last frequencies by far more) plus fp16's subnormal step (6e-8, the
    smallest frequencies of a large theta)."""
    import torch
    want = rope_inv_freq(sizes.rope_theta, sizes.head_dim)
    implied = f"the RoPE config.json implies (rope_theta {sizes.rope_theta:g}, head_dim {sizes.head_dim})"
    if tuple(value.shape) != tuple(want.shape):
        raise CheckpointError(f"{key} has shape {tuple(value.shape)}, {implied} has {tuple(want.shape)}: the "
                              "checkpoint's LLaMA is not the one config.json describes.")
    if not value.is_floating_point():
        raise CheckpointError(f"{key} has dtype {value.dtype}, expected floating point RoPE frequencies.")
    got = value.detach().to(torch.float32)
    ok = (got - want).abs() <= ROPE_ATOL + ROPE_RTOL * want.abs()        # False for NaN too
    if not bool(ok.all()):
        j = int((~ok).nonzero()[0])
        raise CheckpointError(f"{key} values disagree with {implied}: element {j} is {float(got[j]):.6g}, "
                              f"expected {float(want[j]):.6g}. Fix rope_theta / the head sizes in config.json, or "
                              "the checkpoint is another model's.")
