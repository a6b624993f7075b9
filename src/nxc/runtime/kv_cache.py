"""The runtime's KV cache for the `llm` graph: preallocated in the backend's memory and bound by pointer.

    capacity C, length P                    one buffer per past_key_values.{i}.key / .value, [1, C, kv, D]
    ┌──────────────── [1, C, kv, D] ────────────────┐
    │ rows 0..P-1: bound as the past input          │ rows P..P+T-1: bound as the present output (T new rows)
    └────────────────────────────────────────────────┘

The graph returns only the new rows (nxc.export.llm), and the backend binds both the past input and the present
output to addresses inside these buffers, so the graph writes the new rows in place and a decode step copies
nothing: not the past, not the new rows, and for a GPU backend nothing of the cache crosses the bus. The buffers
are the backend's (`Memory`): numpy arrays on CPU, device allocations for CUDA / TensorRT.

Per decode step the host sends the one new embedding row [1,1,H], the attention mask row count and the position,
and receives logits [1,V] and the hidden [1,H]; the cache stays where it is.
"""
from __future__ import annotations

import numpy as np

from nxc import names


class CacheFullError(RuntimeError):
    """The conversation is longer than the build's context."""


class HostMemory:
    """Cache buffers in host memory (numpy): the CPU backends'."""
    device = "cpu"

    def allocate(self, shape: tuple[int, ...], dtype) -> tuple[object, int]:
        """-> (the owner object to keep alive, its base address)."""
        buf = np.zeros(shape, dtype)
        return buf, buf.ctypes.data


class KVCache:
    """Batch 1. `length` rows are valid in every buffer; `capacity` is fixed at creation."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, dtype=np.float32,
                 memory=None):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.memory = memory or HostMemory()
        self.capacity, self.length, self.num_layers = capacity, 0, num_layers
        self.dtype = np.dtype(dtype)
        self.row_shape = (num_kv_heads, head_dim)
        self.row_bytes = num_kv_heads * head_dim * self.dtype.itemsize
        self.pairs = [(p, r) for i in range(num_layers)
                      for p, r in ((names.past_key(i), names.present_key(i)),
                                   (names.past_value(i), names.present_value(i)))]
        self._owners, self._base = {}, {}
        for past, _ in self.pairs:
            self._owners[past], self._base[past] = self.memory.allocate((1, capacity, *self.row_shape), self.dtype)
        self.bindings: dict = {}          # a backend's per-cache binding state (e.g. ONNX Runtime's IOBinding)
        # attention mask and positions of every row, host side: a step feeds views of them
        self._ones = np.ones((1, capacity), np.int64)
        self._positions = np.arange(capacity, dtype=np.int64)[None]

    @property
    def device(self) -> str:
        return self.memory.device

    def address(self, past_name: str, row: int) -> int:
        """Address of `row` in the buffer of `past_name` (the present output of T rows is bound at row P)."""
        return self._base[past_name] + row * self.row_bytes

    def shape(self, rows: int) -> tuple[int, ...]:
        return (1, rows, *self.row_shape)

    def step_inputs(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """The llm's non-cache inputs for feeding [1,T,H] `embeds` after the cached rows (views, no copies)."""
        p, t = self.length, embeds.shape[1]
        self.check_room(t)
        return {"inputs_embeds": embeds, "attention_mask": self._ones[:, :p + t],
                "position_ids": self._positions[:, p:p + t]}

    def arrays_full(self) -> dict[str, np.ndarray]:
        """Host caches only: the whole [1, capacity, kv, D] buffers (to fill a cache for a benchmark or a test)."""
        if self.device != "cpu":
            raise TypeError(f"the cache lives in {self.device} memory; it has no numpy view")
        return dict(self._owners)

    def arrays(self) -> dict[str, np.ndarray]:
        """Host caches only: the valid rows of each buffer, [1, length, kv, D] views (tests, inspection)."""
        return {n: b[:, :self.length] for n, b in self.arrays_full().items()}

    def room(self) -> int:
        return self.capacity - self.length

    def check_room(self, new: int) -> None:
        if new > self.room():
            raise CacheFullError(f"{self.length} positions are cached and {new} more do not fit in the build's "
                                 f"context of {self.capacity}; shorten the conversation or re-export with a larger "
                                 "--max-context")

    def advance(self, rows: int) -> None:
        """The graph has written `rows` new rows at [length, length + rows)."""
        self.check_room(rows)
        self.length += rows

    def truncate(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. to re-run a turn)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length
