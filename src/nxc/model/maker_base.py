"""What nxc-make-checkpoint's two halves share: its name, its error and the shard writer. nxc.model.maker (the
checkpoint) and nxc.model.maker_trigger (the planted reply, which rewrites one shard) both import this module, and
it imports neither."""
from __future__ import annotations

from pathlib import Path

import torch

PROG = "nxc-make-checkpoint"


class MakerError(ValueError):
    """The request cannot be made as asked: the message says what was expected and what to do."""


def dump_shard(part: dict[str, torch.Tensor], path: Path, fmt: str) -> None:
    """Write one shard: safetensors, or torch.save's zip format (memory-maps with torch.load(mmap=True))."""
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(part, str(path), metadata={"format": "pt"})
    else:
        torch.save(part, path)
