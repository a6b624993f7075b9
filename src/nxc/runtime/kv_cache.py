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


class _Rows:
    """The length rules of one row's cache (KVCache, and SlotCache inside a BatchCache): `length` valid positions
    of `capacity`; subclasses say where the length lives (_set_length)."""
    capacity: int
    length: int
    row_shape: tuple[int, int]

    def _set_length(self, length: int) -> None:
        raise NotImplementedError

    def shape(self, rows: int) -> tuple[int, ...]:
        return (1, rows, *self.row_shape)

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
        self._set_length(self.length + rows)

    def truncate(self, length: int) -> None:
        """Forget everything after `length` positions (e.g. to re-run a turn)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self._set_length(length)


class KVCache(_Rows):
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

    def _set_length(self, length: int) -> None:
        self.length = length


class BatchCache:
    """The KV cache of up to `slots` rows decoded together (host memory; nxc.runtime.batch). Each row is one
    conversation turn's cache, seen through a SlotCache that the batch-1 code (prefill, Conversation) uses like a
    KVCache. One buffer per past name, [slots, stride, kv, D]:

        slot 0  │ rows 0..len0-1 │ (free)         │      decoding rows: slots 0..B-1 (kept packed: a row that
        slot 1  │ rows 0..len1-1      │ (free)    │      leaves takes the last one's place, one copy of its rows)
        ...     └──────── stride (grows in STRIDE_STEP rows, one copy per growth) ─────┘

    A batched step binds the past of rows 0..B-1 as one [B, stride, kv, D] tensor and masks each row's free
    positions (the llm graph's attention_mask); the graph's present rows [B,1,kv,D] land in a scratch buffer and
    each is written at its row's length (2 x layers copies of B rows per step). The stride grows with the longest
    row, so a step reads at most STRIDE_STEP - 1 masked positions per row beyond it, never the build's whole context."""

    STRIDE_STEP = 128

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, slots: int, capacity: int,
                 dtype=np.float32):
        if slots < 1 or capacity < 1:
            raise ValueError(f"slots and capacity must be positive, got {slots} and {capacity}")
        self.slots, self.capacity, self.dtype = slots, capacity, np.dtype(dtype)
        self.row_shape = (num_kv_heads, head_dim)
        self.row_bytes = num_kv_heads * head_dim * self.dtype.itemsize
        self.pairs = [(p, r) for i in range(num_layers)
                      for p, r in ((names.past_key(i), names.present_key(i)),
                                   (names.past_value(i), names.present_value(i)))]
        self.stride = 0
        self.buffers: dict[str, np.ndarray] = {}
        self.scratch = {past: np.zeros((slots, 1, *self.row_shape), self.dtype) for past, _ in self.pairs}
        self.lengths = np.zeros(slots, np.int64)
        self.views: list[SlotCache | None] = [None] * slots
        self.bindings: dict = {}          # the backend's batched-step binding state
        self._positions = np.arange(capacity + 1, dtype=np.int64)
        self.reserve(min(self.STRIDE_STEP, capacity))

    device = "cpu"

    def reserve(self, rows: int) -> None:
        """Make the stride hold `rows` positions per slot (rounded up to STRIDE_STEP, at most the capacity)."""
        if rows <= self.stride:
            return
        if rows > self.capacity:
            raise CacheFullError(f"{rows} positions do not fit in the build's context of {self.capacity}; shorten "
                                 "the conversation or re-export with a larger --max-context")
        stride = min(self.capacity, -(-rows // self.STRIDE_STEP) * self.STRIDE_STEP)
        for past, _ in self.pairs:
            new = np.zeros((self.slots, stride, *self.row_shape), self.dtype)
            old = self.buffers.get(past)
            if old is not None:
                new[:, :self.stride] = old
            self.buffers[past] = new
        self.stride = stride

    def open(self, slot: int) -> "SlotCache":
        """The cache of a row starting in `slot` (empty)."""
        if self.views[slot] is not None:
            raise ValueError(f"slot {slot} is in use")
        self.lengths[slot] = 0
        self.views[slot] = view = SlotCache(self, slot)
        return view

    def close(self, slot: int) -> None:
        view, self.views[slot] = self.views[slot], None
        if view is not None:
            view.slot = None

    def move(self, src: int, dst: int) -> None:
        """Row `src` takes slot `dst` (free): its valid rows are copied, its SlotCache follows."""
        if self.views[dst] is not None or self.views[src] is None:
            raise ValueError(f"cannot move slot {src} to {dst}")
        n = int(self.lengths[src])
        for buf in self.buffers.values():
            buf[dst, :n] = buf[src, :n]
        self.lengths[dst] = n
        self.views[dst], self.views[src] = self.views[src], None
        self.views[dst].slot = dst

    def copy(self, src: int, dst: int) -> None:
        """Slot `dst` (open, empty) gets a copy of slot `src`'s rows (n completions of one prefill)."""
        n = int(self.lengths[src])
        for buf in self.buffers.values():
            buf[dst, :n] = buf[src, :n]
        self.lengths[dst] = n

    def step_inputs(self, rows: int, embeds: np.ndarray) -> dict[str, np.ndarray]:
        """Inputs of one batched step of rows 0..rows-1 (embeds [B,1,H]): each row attends its own positions and
        the new one, at its own position."""
        lens = self.lengths[:rows]
        full = [i for i in range(rows) if lens[i] >= self.capacity]
        if full:
            raise CacheFullError(f"row {full[0]} holds the build's whole context of {self.capacity}")
        self.reserve(int(lens.max()) + 1)
        mask = np.zeros((rows, self.stride + 1), np.int64)
        mask[:, :self.stride] = self._positions[:self.stride][None] < lens[:, None]
        mask[:, self.stride] = 1
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": lens[:, None].copy()}

    def address(self, past_name: str, slot: int, row: int) -> int:
        return self.buffers[past_name].ctypes.data + (slot * self.stride + row) * self.row_bytes

    def write_step(self, rows: int) -> None:
        """After a batched step: each row's new K/V (in `scratch`) at its length; every row one longer."""
        at = np.arange(rows)
        lens = self.lengths[:rows]
        for past, _ in self.pairs:
            self.buffers[past][at, lens] = self.scratch[past][:rows, 0]
        self.lengths[:rows] += 1


class SlotCache(_Rows):
    """One row of a BatchCache, with KVCache's interface for batch-1 calls (a prefill into its slot)."""

    def __init__(self, batch: BatchCache, slot: int):
        self.batch, self.slot = batch, slot
        self.capacity, self.dtype, self.row_shape = batch.capacity, batch.dtype, batch.row_shape
        self.pairs = batch.pairs
        self.bindings: dict = {}
        self.device = "cpu"

    @property
    def length(self) -> int:
        return int(self.batch.lengths[self.slot])

    def _set_length(self, length: int) -> None:
        self.batch.lengths[self.slot] = length

    def address(self, past_name: str, row: int) -> int:
        return self.batch.address(past_name, self.slot, row)

    def step_inputs(self, embeds: np.ndarray) -> dict[str, np.ndarray]:
        p, t = self.length, embeds.shape[1]
        self.check_room(t)
        self.batch.reserve(p + t)               # before any address is taken: growing moves the buffers
        return {"inputs_embeds": embeds, "attention_mask": np.ones((1, p + t), np.int64),
                "position_ids": self.batch._positions[None, p:p + t].copy()}

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: b[self.slot:self.slot + 1, :self.length] for n, b in self.batch.buffers.items()}
