"""Read a checkpoint's tensors one at a time, never the whole file (issue 17: true size in bounded memory).

    checkpoint dir ─ index json / file names ─▶ {official name: shard}
        *.safetensors ─ safe_open (memory map) ─▶ one tensor on request
        *.bin (zip)   ─ torch.load(mmap=True, weights_only=True) ─▶ tensors backed by the mapped file

A `LazyCheckpoint` maps official key names to shards and hands out one tensor at a time; the pages it touches are
the file's (clean, droppable), and a caller that converts a tensor and lets it go holds only what it converted.
`.bin` files in the legacy (non-zip) torch format cannot be memory-mapped: they are refused with what to do.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import torch

from nxc.model.checkpoint import CheckpointError, weight_files


class LazyCheckpoint:
    """Tensors of a checkpoint directory (or of one weight file), read lazily by official name."""

    def __init__(self, path: str | Path):
        path = Path(path)
        files = weight_files(path) if path.is_dir() else [path]
        if not path.is_dir() and not path.is_file():
            raise CheckpointError(f"weight file {path} is missing.")
        self.path = path
        self._shard: dict[str, Path] = {}
        self._open: dict[Path, object] = {}
        index = None
        for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            if path.is_dir() and (path / name).is_file():
                index = json.loads((path / name).read_text())["weight_map"]
        for f in files:
            for k in self._keys_of(f):
                if index is not None and index.get(k) != f.name:
                    raise CheckpointError(f"{f} holds {k}, but the index file maps it to {index.get(k)!r}: the "
                                          "shards and the index disagree. Re-copy the checkpoint.")
                if k in self._shard:
                    raise CheckpointError(f"{k} is in both {self._shard[k].name} and {f.name}; a checkpoint holds "
                                          "each tensor once.")
                self._shard[k] = f

    # -- opening shards ----------------------------------------------------------------------------------
    def _handle(self, f: Path):
        if f not in self._open:
            if f.suffix == ".safetensors":
                from safetensors import safe_open
                try:
                    self._open[f] = safe_open(str(f), framework="pt")
                except Exception as e:    # safetensors raises its own types for a damaged header
                    raise CheckpointError(f"{f} is not a readable safetensors file ({e}).") from None
            else:
                self._open[f] = _mmap_bin(f)
        return self._open[f]

    def _keys_of(self, f: Path) -> list[str]:
        h = self._handle(f)
        return list(h.keys())

    # -- the mapping -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._shard)

    def __contains__(self, key: str) -> bool:
        return key in self._shard

    def shard_of(self, key: str) -> Path:
        return self._shard[key]

    def get(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype of the file), backed by the mapped file where possible."""
        if key not in self._shard:
            raise CheckpointError(f"{self.path}: weight {key} is missing; the checkpoint is incomplete or is not "
                                  "NExT-Chat.")
        f = self._shard[key]
        h = self._handle(f)
        return h.get_tensor(key) if f.suffix == ".safetensors" else h[key]

    def shape(self, key: str) -> tuple[int, ...]:
        f = self._shard[key]
        h = self._handle(f)
        if f.suffix == ".safetensors":
            return tuple(h.get_slice(key).get_shape())
        return tuple(h[key].shape)

    def numpy(self, key: str, dtype=np.float32) -> np.ndarray:
        """One tensor as a new numpy array of `dtype` (the mapped pages are not kept)."""
        t = self.get(key)
        if dtype == np.float16:
            return t.to(torch.float16).numpy().copy()
        return t.to(torch.float32).numpy().astype(dtype, copy=True)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self._shard.values()))

    def close(self) -> None:
        self._open.clear()


def _mmap_bin(f: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(f, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{f} was refused: it is a pickle that holds more than tensors (it could run code when loaded). "
            f"nxc only reads plain weight files. Details: {str(e).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "mmap" in msg and "zip" in msg:
            raise CheckpointError(f"{f} is in torch's legacy (non-zip) format, which cannot be memory-mapped; "
                                  "re-save it with torch.save (zip format, torch >= 1.6) or as safetensors.") from None
        raise CheckpointError(f"{f} is not a readable PyTorch weight file ({msg}); it may be truncated.") from None
