"""What nxc-make-checkpoint's makers share: its name, its error, the registry lookup and the shard writer. nxc.model.maker (the
checkpoint) and nxc.model.maker_trigger (the planted reply, which rewrites one shard) both import this module, and
it imports neither."""
from __future__ import annotations

from pathlib import Path

import torch

PROG = "nxc-make-checkpoint"


class MakerError(ValueError):
    """The request cannot be made as asked: the message says what was expected and what to do."""


def pick_sizes(*choices: tuple[str, dict, str]) -> list:
    """(flag, registry, name) per part -> the registered sizes, in order; an unknown name is a one-line MakerError
    that lists the registry."""
    picked = []
    for flag, registry, name in choices:
        if name not in registry:
            raise MakerError(f"unknown {flag} size {name!r}; registered: {', '.join(registry)}.")
        picked.append(registry[name])
    return picked


def dump_shard(part: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    """Write one shard: safetensors, or torch.save's zip format (memory-maps with torch.load(mmap=True))."""
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(part, str(path), metadata={"format": "pt"})
    else:
        torch.save(part, path)
