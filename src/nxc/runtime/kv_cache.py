"""The runtime's KV cache for the `llm` graph: preallocated, written in place, never copied. numpy only.

    capacity C, length P                     one buffer per past_key_values.{i}.key / .value
    ┌──────────────── [1, C, kv, D] ────────────────┐
    │ rows 0..P-1: fed as past (a contiguous view)   │ rows P..P+T-1: written from present.{i}.* (T new rows)
    └────────────────────────────────────────────────┘

The graph returns only the new rows (nxc.export.llm explains the choice), so a decode step costs O(1) cache
writes here and no copy of the past.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from nxc import names


class CacheFullError(RuntimeError):
    """The conversation is longer than the build's context."""


class KVCache:
    """Preallocated cache for batch 1. State: `length` rows are valid; `capacity` is fixed at creation."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype=np.float32):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity, self.length, self.num_layers = capacity, 0, num_layers
        shape = (1, capacity, num_kv_heads, head_dim)
        self._buf = {n: np.zeros(shape, dtype) for i in range(num_layers)
                     for n in (names.past_key(i), names.past_value(i))}

    def past(self) -> dict[str, np.ndarray]:
        """Feeds for the next llm call: views [1, length, kv, D] of the buffers (no copy)."""
        return {n: b[:, :self.length] for n, b in self._buf.items()}

    def feeds(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """All `llm` inputs for feeding [1,T,H] `embeds` after the cached positions (batch 1, no padding)."""
        p, t = self.length, embeds.shape[1]
        self.check_room(t)
        return {"inputs_embeds": np.ascontiguousarray(embeds, np.float32),
                "attention_mask": np.ones((1, p + t), np.int64),
                "position_ids": np.arange(p, p + t, dtype=np.int64)[None], **self.past()}

    def room(self) -> int:
        return self.capacity - self.length

    def check_room(self, new: int) -> None:
        if new > self.room():
            raise CacheFullError(f"{self.length} positions are cached and {new} more do not fit in the build's "
                                 f"context of {self.capacity}; shorten the conversation or re-export with a larger "
                                 "--max-context")

    def append(self, outputs: Mapping[str, np.ndarray]) -> None:
        """Write the present.{i}.* rows an llm call returned at [length, length+T) and advance."""
        t = outputs[names.present_key(0)].shape[1]
        self.check_room(t)
        for i in range(self.num_layers):
            for src, dst in ((names.present_key(i), names.past_key(i)), (names.present_value(i), names.past_value(i))):
                self._buf[dst][:, self.length:self.length + t] = outputs[src]
        self.length += t

    def truncate(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. to re-run a turn)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
