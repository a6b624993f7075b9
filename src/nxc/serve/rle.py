"""COCO run-length encoding of masks (numpy only): what the server sends, what a client decodes.

    rle = encode(mask)          # {"size": [H, W], "counts": "PQ`0..."}  (pycocotools' compressed string)
    mask = decode(rle)          # [H, W] bool

Runs are counted over the mask in column-major order, starting with a run of zeros (possibly empty), and the
counts are packed as pycocotools' `rleToString` does: 5 bits per character, offset by 48, each count after the
second stored as the difference to the count two before. `pycocotools.mask.decode` reads these strings as they are.
"""
from __future__ import annotations

import numpy as np


class RleError(ValueError):
    """An RLE object that is not a COCO RLE of the size it claims."""


def runs(mask: np.ndarray) -> list[int]:
    """[H,W] bool -> run lengths in column-major order, the first run being zeros."""
    flat = np.asarray(mask, bool).ravel(order="F")
    if flat.size == 0:
        return []
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    return ([0] + counts) if flat[0] else counts


def _pack(counts: list[int]) -> str:
    out = []
    for i, x in enumerate(counts):
        if i > 2:
            x -= counts[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _unpack(s: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(s):
        x, k, more = 0, 0, True
        while more:
            if p >= len(s):
                raise RleError("RLE counts string ends inside a number")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise RleError(f"RLE counts string has a character {s[p]!r} outside the COCO alphabet")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def encode(mask: np.ndarray) -> dict:
    """[H,W] bool mask -> {"size": [H, W], "counts": str}."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise RleError(f"a mask to encode must be [H, W], got shape {mask.shape}")
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _pack(runs(mask))}


def decode(rle: dict) -> np.ndarray:
    """{"size": [H, W], "counts": str | list[int]} -> [H,W] bool."""
    try:
        h, w = (int(v) for v in rle["size"])
        counts = rle["counts"]
    except (KeyError, TypeError, ValueError):
        raise RleError('an RLE must be {"size": [H, W], "counts": ...}') from None
    counts = _unpack(counts) if isinstance(counts, str) else [int(c) for c in counts]
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise RleError(f"RLE counts cover {sum(counts)} pixels, the size {h}x{w} needs {h * w}")
    values = np.zeros(len(counts), bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()
