"""Next-token choice from last-position logits. Torch-free, shared by the reference and the runtime.

Greedy when temperature == 0; otherwise HF's warper order: temperature, top-k, top-p, then one draw
from a numpy Generator, so a seed gives the same tokens in the reference and in the runtime.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0        # 0: off
    top_p: float = 1.0    # 1.0: off
    seed: int | None = None

    def __post_init__(self):
        if not (self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def pick_token(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator | None) -> int:
    """logits: [V] float -> token id."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1)
    if params.greedy:
        return int(np.argmax(logits))
    scores = logits / params.temperature
    if params.top_k and params.top_k < scores.size:
        kth = np.partition(scores, -params.top_k)[-params.top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    order = np.argsort(-scores, kind="stable")
    probs = np.exp(scores[order] - scores[order[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        order = order[:keep]
    u = (rng or params.rng()).random()
    return int(order[min(int(np.searchsorted(np.cumsum(probs), u, side="right")), len(order) - 1)])
