"""Next-token choice from last-position logits. Torch-free, shared by the reference and the runtime.

Greedy when temperature == 0; otherwise HF's warper order: temperature, top-k, top-p, then one draw
from a numpy Generator, so a seed gives the same tokens in the reference and in the runtime.
`banned` ids are never chosen: the tokens only a head may emit (`<boxes>`) and the image span's tokens, whose
appearance anywhere else would break the decode loop's dispatch and the next turn's prompt.
"""
from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off
    seed: int | None = None

    def __post_init__(self):
        if not (_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        if not (_whole(self.top_k) and self.top_k >= 0):
            raise ValueError(f"top_k must be a whole number >= 0 (0 = off), got {self.top_k!r}")
        if not (_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not (_whole(self.seed) and self.seed >= 0):
            raise ValueError(f"seed must be a whole number >= 0 or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _whole(v) -> bool:
    """An int (numpy's too), not a bool: top_k=True or seed=1.5 is a mistake, not 1."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _number(v) -> bool:
    return (_whole(v) or isinstance(v, (float, np.floating))) and math.isfinite(v)


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None,
               banned: Collection[int] = ()) -> int:
    """logits: [V] float -> token id, never one of `banned` (masked before greedy / temperature / top-k / top-p).
    Raises ValueError when every token is banned."""
    logits = np.array(logits, dtype=np.float64).reshape(-1)
    if len(banned):
        idx = np.unique(np.asarray(list(banned), dtype=np.int64))
        if idx[0] < 0 or idx[-1] >= logits.size:
            raise ValueError(f"banned token ids must be in 0..{logits.size - 1} (the logits' vocabulary), got "
                             f"{idx[(idx < 0) | (idx >= logits.size)].tolist()}")
        if idx.size == logits.size:
            raise ValueError(f"all {logits.size} tokens are banned from sampling; nothing can be chosen")
        logits[idx] = -np.inf
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    order = np.argsort(-scores, kind="stable")
    probs = np.exp(scores[order] - scores[order[0]])
    probs /= probs.sum()
    n = int(np.count_nonzero(probs))    # masked tokens (prob 0) sort last: not even float rounding may pick one
    order, probs = order[:n], probs[:n]
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    u = (rng or params.rng()).random()
    return int(order[min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(order) - 1)])
