"""Read a checkpoint's tensors one at a time, never the whole file (issue 17: true size in bounded memory).

    checkpoint dir ─ index json / file names ─▶ {official name: shard}
        *.safetensors ─ header parsed here, the tensor's bytes read with pread ─▶ one tensor on request
        *.bin (zip)   ─ torch.load(mmap=True, weights_only=True) ─▶ the tensor copied out of the mapping, whose
                        pages are then given back (madvise MADV_DONTNEED)

A `LazyCheckpoint` maps official key names to shards and hands out one tensor at a time as a tensor of its own:
no page of the file stays mapped in the process once a tensor is read, so reading a 13.5 GB checkpoint from end
to end never counts 13.5 GB of file pages in the reader's resident set (ru_maxrss counts mapped file pages).
`.bin` files in the legacy (non-zip) torch format cannot be memory-mapped: they are refused with what to do.
"""
from __future__ import annotations

import ctypes
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from nxc.model.layout import CheckpointError, weight_files

_ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsFile:
    """A safetensors file read by offsets: the header once, then each tensor's bytes with one pread."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n > 100_000_000:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, struct.error, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}).") from None
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._meta = header

    def keys(self) -> list[str]:
        return list(self._meta)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._meta[key]["shape"])

    def read(self, key: str) -> torch.Tensor:
        m = self._meta[key]
        if m["dtype"] not in _ST_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has dtype {m['dtype']}, which nxc does not read.")
        a, b = m["data_offsets"]
        buf = bytearray(b - a)
        with open(self.path, "rb") as f:
            got = os.preadv(f.fileno(), [buf], self._start + a)
        if got != b - a:
            raise CheckpointError(f"{self.path}: tensor {key} is cut short ({got} of {b - a} bytes); the file is "
                                  "truncated. Re-copy it.")
        if not buf:
            return torch.empty(m["shape"], dtype=_ST_DTYPES[m["dtype"]])
        return torch.frombuffer(buf, dtype=_ST_DTYPES[m["dtype"]]).reshape(m["shape"])


class BinFile:
    """A zip-format torch weight file, memory-mapped; each tensor is copied out and its pages given back."""

    def __init__(self, path: Path):
        self.path = path
        self._d = _mmap_bin(path)

    def keys(self) -> list[str]:
        return list(self._d)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._d[key].shape)

    def read(self, key: str) -> torch.Tensor:
        view = self._d[key]
        out = view.clone()
        _give_back(view)
        return out


_libc = ctypes.CDLL(None, use_errno=True) if hasattr(ctypes, "CDLL") else None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4


def _give_back(view: torch.Tensor) -> None:
    """Drop the mapped file pages under `view` from this process (they stay in the page cache); best effort."""
    if _libc is None or view.numel() == 0:
        return
    start = view.data_ptr()
    end = start + view.numel() * view.element_size()
    lo, hi = start - start % _PAGE, end + (-end % _PAGE)
    _libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def open_weight_file(path: Path) -> SafetensorsFile | BinFile:
    return SafetensorsFile(path) if path.suffix == ".safetensors" else BinFile(path)


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
            self._open[f] = open_weight_file(f)
        return self._open[f]

    def _keys_of(self, f: Path) -> list[str]:
        return self._handle(f).keys()

    # -- the mapping -------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._shard)

    def __contains__(self, key: str) -> bool:
        return key in self._shard

    def shard_of(self, key: str) -> Path:
        return self._shard[key]

    def get(self, key: str) -> torch.Tensor:
        """One tensor as stored (dtype of the file), a tensor of its own (no mapped pages kept)."""
        if key not in self._shard:
            raise CheckpointError(f"{self.path}: weight {key} is missing; the checkpoint is incomplete or is not "
                                  "NExT-Chat.")
        return self._handle(self._shard[key]).read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._handle(self._shard[key]).shape(key)

    def numpy(self, key: str, dtype=np.float32) -> np.ndarray:
        """One tensor as a new numpy array of `dtype` (the mapped pages are not kept)."""
        t = self.get(key)
        if dtype == np.float16:
            return t.to(torch.float16).numpy()
        t = t.to(torch.float32)
        return t.numpy() if dtype == np.float32 else t.numpy().astype(dtype)

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
