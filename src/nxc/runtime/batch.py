"""Continuous batching: many conversation turns decoded together, one llm call per step for all of them.

    submit(conv, text) ─▶ checked, image rows made (caller's thread) ─▶ waiting (QueueFull: no row, max_queue wait)
                                                                            │ a free row, at a step boundary
    scheduler thread, per step:                                             ▼
      1. the prefilling row (one at a time) takes one prompt chunk ─▶ when done, it decodes from the next step
      2. choose() over the decoding rows (nxc.decode: the loop's rules, a head call for all rows fed its trigger)
         ─▶ Token / Box events to each row's handle
      3. ended or cancelled rows leave (the last row takes the freed slot), their handles get the end
      4. one llm call for the rows left: [B,1,H] in, logits [B,V] + hidden [B,H] out (BatchCache: in place)
    handle (caller's thread) ─▶ events as they come, then the turn's finish (SAM masks) ─▶ Done

The scheduler owns admission, rows, cancellation and draining; the Pipeline's runners own graphs; nxc.decode owns
the rules. A row's answer is the one Conversation.stream gives (same prompt, same rules, same sampling generator):
greedy ids equal batch 1's, as the tests check, unless two logits tie to float rounding (a batched step sums in
another order).
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from nxc import names
from nxc.decode import Row, choose
from nxc.runtime.conversation import Conversation
from nxc.runtime.events import Done
from nxc.runtime.pipeline import PREFILL_CHUNK
from nxc.runtime.turn import Reply, Turn
from nxc.runtime.timing import NO_TIMELINE


class QueueFull(RuntimeError):
    """No free row for the turn and max_queue turns already wait for one: try again later (nxc-serve answers 503)."""


class Closed(RuntimeError):
    """The batcher is draining or stopped and admits nothing new."""


@dataclass
class _Request:
    conv: Conversation
    turn: Turn
    rows: np.ndarray                      # [T,H] prompt rows still to feed
    handle: "Handle"
    submitted: float = field(default_factory=time.perf_counter)
    fed: int = 0                          # prompt rows fed so far
    reply: Reply = field(default_factory=Reply)
    row: Row | None = None
    choice: object = None                 # this step's Choice, until the step feeds it
    clones: list = field(default_factory=list)   # n > 1: the other completions, rows copied from this prefill


class Handle:
    """A submitted turn: iterate it for Token / Box events and the final Done (its finish, e.g. SAM masks, runs in
    the iterating thread); cancel() frees its row at the next step boundary."""

    def __init__(self):
        self._events: queue.Queue = queue.Queue()
        self.cancelled = False
        self.queue_wait: float | None = None       # seconds from submit to its first prompt chunk

    def cancel(self) -> None:
        self.cancelled = True

    def __iter__(self) -> Iterator:
        while True:
            kind, value = self._events.get()
            if kind == "event":
                yield value
            elif kind == "end":
                req: _Request = value
                conv = req.conv
                result = conv._finish(req.reply, req.turn)
                conv.timeline.finish()
                conv.timeline = NO_TIMELINE
                yield from req.reply.late
                yield Done(result)
                return
            elif kind == "error":
                raise value
            else:                                  # cancelled
                return

    def result(self):
        """Wait for the turn and return its ChatResult (None if it was cancelled)."""
        done = None
        for ev in self:
            if isinstance(ev, Done):
                done = ev.result
        return done


class Batcher:
    """Decodes the turns submitted to it in batches of up to `max_batch` rows (ONNX Runtime backend, KV cache in
    host memory). Thread-safe: any thread may submit; one scheduler thread runs the graphs."""

    def __init__(self, pipe, *, max_batch: int = 8, max_queue: int = 32):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch} and {max_queue}")
        self.runner, self.cache = pipe.batch_rows(max_batch, what="batched decoding",
                                                  instead="decode one turn at a time (Conversation.stream)")
        self.pipe, self.max_batch, self.max_queue = pipe, max_batch, max_queue
        self._waiting: deque[_Request] = deque()
        self._rows: list[_Request] = []          # decoding, in slot order
        self._prefilling: _Request | None = None  # in slot len(self._rows)
        self._cond = threading.Condition()
        self._closing = False
        self._eos = pipe.tokens[names.EOS]
        self.steps = 0
        self.rows_per_step: deque[int] = deque(maxlen=256)       # recent steps (metrics)
        self._thread = threading.Thread(target=self._loop, name="nxc-batcher", daemon=True)
        self._thread.start()

    # -- callers --------------------------------------------------------------------------------------
    def submit(self, conv: Conversation, text: str, **kwargs) -> Handle:
        """Check the turn and make its prompt rows here (errors raise in the caller), then queue it. kwargs as
        Conversation.stream's (boxes, max_new_tokens, temperature, top_p, top_k, seed, iou_threshold,
        special_tokens_in_text). Raises QueueFull or Closed."""
        return self.submit_n(conv, text, 1, **kwargs)[0]

    def submit_n(self, conv: Conversation, text: str, n: int, *, timelines: list | None = None,
                 **kwargs) -> list[Handle]:
        """n completions of one turn from one prefill: the prompt is fed once, then its rows are copied to n - 1
        more rows, each sampling with its own generator (seed + i when a seed is given). timelines: one
        nxc.runtime.timing.Timeline per completion, to record its stages (a batched step's time counts as decode
        for every row in it)."""
        timelines = list(timelines) if timelines is not None else [NO_TIMELINE] * n
        conv.timeline = timelines[0]
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be a whole number from 1 to the batch's {self.max_batch} rows, got {n!r}")
        with self._cond:
            self._check_admission(n)              # early, before the prompt's work; decided again below
        turn = conv._begin(text, boxes=kwargs.pop("boxes", None), max_new_tokens=kwargs.pop("max_new_tokens", None),
                           temperature=kwargs.pop("temperature", 0.0), top_p=kwargs.pop("top_p", 1.0),
                           top_k=kwargs.pop("top_k", 0), seed=kwargs.pop("seed", None),
                           iou_threshold=kwargs.pop("iou_threshold", ...),
                           special_tokens_in_text=kwargs.pop("special_tokens_in_text", False),
                           head_options=kwargs.pop("head_options", None))
        if kwargs:
            raise TypeError(f"unknown argument(s) {sorted(kwargs)}")
        conv.cached_ids = []                       # the turn's cache is a fresh batch row: the whole prompt is fed
        conv.cache.truncate(0)
        rows = conv._prefill_rows(turn.ids, turn.region)
        req = _Request(conv, turn, rows, Handle())
        for i in range(1, n):
            seed = None if turn.sampling.seed is None else turn.sampling.seed + i
            twin = conv.twin()
            twin.timeline = timelines[i]
            req.clones.append(_Request(twin, replace(turn, sampling=replace(turn.sampling, seed=seed)), rows,
                                       Handle()))
        with self._cond:
            self._check_admission(n)
            self._waiting.append(req)
            self._cond.notify()
        return [req.handle] + [c.handle for c in req.clones]

    def _check_admission(self, n: int) -> None:
        """Under self._cond: admit a turn of n rows (n <= max_batch) or raise. One that free rows will start is
        admitted whatever max_queue says; max_queue bounds only the turns waiting for a row (0: no waiting)."""
        if self._closing:
            raise Closed("the batcher is shutting down and takes no new turns")
        free, blocked = self._promised()
        if blocked >= self.max_queue and not (blocked == 0 and n <= free):
            raise QueueFull(f"no row for the turn ({n} needed, {free} of {self.max_batch} free) and {blocked} turns "
                            f"wait for a row (max_queue {self.max_queue}); retry shortly")

    def _promised(self) -> tuple[int, int]:
        """Under self._cond: (rows free, turns waiting for a row). Rows are promised in arrival order: to the
        decoding rows, the prefilling turn's n, then each waiting turn's n while they fit; the first waiting turn
        that does not fit, and every turn behind it, waits for a row (the scheduler starts turns in order)."""
        free = self.max_batch - len(self._rows)
        if self._prefilling is not None:
            free -= 1 + len(self._prefilling.clones)
        for i, r in enumerate(self._waiting):
            if 1 + len(r.clones) > free:
                return free, len(self._waiting) - i
            free -= 1 + len(r.clones)
        return free, 0

    def stats(self) -> dict:
        with self._cond:
            return {"rows": len(self._rows) + (self._prefilling is not None), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue, "steps": self.steps,
                    "mean_rows_per_step": float(np.mean(self.rows_per_step)) if self.rows_per_step else 0.0}

    def close(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop admitting; with drain, finish what runs and waits, else cancel it. Returns when the scheduler ends."""
        with self._cond:
            self._closing = True
            if not drain:
                for r in [*self._waiting, *self._rows] + ([self._prefilling] if self._prefilling else []):
                    r.handle.cancel()
            self._cond.notify()
        self._thread.join(timeout)

    # -- the scheduler --------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._waiting or self._rows or self._prefilling or self._closing):
                    self._cond.wait()
                if self._closing and not (self._waiting or self._rows or self._prefilling):
                    return
                if (self._prefilling is None and self._waiting
                        and len(self._rows) + 1 + len(self._waiting[0].clones) <= self.max_batch):
                    self._prefilling = self._waiting.popleft()
                    wait = time.perf_counter() - self._prefilling.submitted
                    for r in [self._prefilling, *self._prefilling.clones]:
                        r.handle.queue_wait = wait
            try:
                self._step()
            except Exception as e:  # a graph failure ends every row with the error, not a silent hang
                for r in [*self._rows] + ([self._prefilling] if self._prefilling else []):
                    r.handle._events.put(("error", e))
                with self._cond:
                    for slot in range(self.cache.slots):
                        self.cache.close(slot)
                    self._rows, self._prefilling = [], None

    def _step(self) -> None:
        p = self._prefilling
        if p is not None:
            if p.handle.cancelled and all(c.handle.cancelled for c in p.clones):
                self._prefilling = None
                if p.fed:
                    self.cache.close(len(self._rows))
                for r in [p, *p.clones]:
                    r.handle._events.put(("cancelled", None))
            else:
                if p.fed == 0:
                    p.conv.cache = self.cache.open(len(self._rows))
                chunk = p.rows[p.fed:p.fed + PREFILL_CHUNK]
                t0 = time.perf_counter()
                out = self.runner.run_cached(np.ascontiguousarray(chunk[None]), p.conv.cache)
                p.conv.timeline.add("prefill", t0, time.perf_counter())
                p.fed += len(chunk)
                if p.fed == len(p.rows):
                    with self._cond:               # admission sees p's rows prefilling or decoding, never neither
                        self._prefilling = None
                        src = len(self._rows)
                        for r in [p, *p.clones]:
                            if r is not p:
                                r.conv.cache = self.cache.open(len(self._rows))
                                self.cache.copy(src, len(self._rows))
                            r.conv.cached_ids = list(r.turn.ids)
                            r.row = Row(logits=out["logits"][0], hidden=out["hidden"], fed=r.turn.ids[-1],
                                        pick=r.conv._picker(r.turn.sampling), max_new=r.turn.max_new,
                                        room=r.conv.cache.room, tag=r)
                            self._rows.append(r)
        if not self._rows:
            return
        heads = self.pipe.dispatch.triggers
        t0 = time.perf_counter()
        for c in choose([r.row for r in self._rows], heads=heads, eos=self._eos):
            req = c.row.tag
            req.choice = c
            mark = req.conv.timeline.mark()
            events = req.conv._on_token(req.reply, c.token, c.found)
            stage = heads[c.row.fed].stage if c.found is not None else "decode"
            req.conv.timeline.add_outside(stage, t0, time.perf_counter(), mark)
            req.conv.timeline.mark_first_token()
            for ev in events:
                req.handle._events.put(("event", ev))
        for i in reversed(range(len(self._rows))):
            req = self._rows[i]
            if req.row.ended or req.handle.cancelled:
                self._leave(i)
                req.handle._events.put(("cancelled", None) if req.handle.cancelled and not req.row.ended
                                       else ("end", req))
        if not self._rows:
            return
        emb = self.pipe.embeddings
        x = np.concatenate([np.asarray(emb[[r.choice.token]], np.float32)[None] if r.choice.x is None
                            else np.asarray(r.choice.x, np.float32).reshape(1, 1, -1) for r in self._rows])
        t0 = time.perf_counter()
        out = self.runner.run_rows(x, self.cache, len(self._rows))
        t1 = time.perf_counter()
        for r in self._rows:
            r.conv.timeline.add("decode", t0, t1)
        self.steps += 1
        self.rows_per_step.append(len(self._rows))
        for i, r in enumerate(self._rows):
            r.conv.cached_ids.append(r.choice.token)
            r.row.feed(r.choice.token, out["logits"][i], out["hidden"][i:i + 1])

    def _leave(self, i: int) -> None:
        """Row i leaves: its slot is freed, the last decoding row takes it, the prefilling row (if any) moves down."""
        with self._cond:
            last = len(self._rows) - 1
            conv = self._rows[i].conv
            self.cache.close(i)
            conv.forget_cache()    # its row is gone: a next turn of it prefills again
            if i != last:
                self.cache.move(last, i)
            self._rows[i] = self._rows[last]
            self._rows.pop()
            if self._prefilling is not None and self._prefilling.fed:
                self.cache.move(last + 1, last)
