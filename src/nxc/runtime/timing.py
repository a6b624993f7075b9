"""Stage timing for the pipeline (what nxc-profile reads). Torch-free; costs two perf_counter calls per stage.

    tl = Timeline()
    pipe.chat(image, text, timeline=tl)
    tl.events  ->  [Event("preprocess", t0, t1), Event("vision", ...), Event("prefill", ...), Event("decode", ...), ...]
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

STAGES = ("preprocess", "vision", "sam_encoder", "prefill", "decode", "loc_heads", "sam_decoder", "proposals",
          "object_features", "postprocess")


@dataclass
class Event:
    stage: str
    start: float      # perf_counter seconds
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


@dataclass
class Timeline:
    events: list[Event] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)
    end: float | None = None
    first_token: float | None = None

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.events.append(Event(name, t0, time.perf_counter()))

    def add(self, name: str, t0: float, t1: float) -> None:
        self.events.append(Event(name, t0, t1))

    def mark_first_token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def finish(self) -> None:
        self.end = time.perf_counter()

    def totals(self) -> dict[str, float]:
        out = {s: 0.0 for s in STAGES}
        for e in self.events:
            out[e.stage] = out.get(e.stage, 0.0) + e.seconds
        return out

    def count(self, stage: str) -> int:
        return sum(e.stage == stage for e in self.events)

    def add_outside(self, name: str, t0: float, t1: float, mark: int) -> None:
        """add(name, t0, t1) less the stages recorded since len(events) was `mark` (work timed as its own stages
        inside this span, e.g. a module call run as a token arrives, is not counted twice)."""
        inner = sum(e.seconds for e in self.events[mark:])
        self.events.append(Event(name, t0, max(t0, t1 - inner)))

    def mark(self) -> int:
        return len(self.events)


class _NoTimeline:
    """Stand-in when nobody is timing: stage() is a no-op context."""

    @contextmanager
    def stage(self, name: str):
        yield

    def add(self, name: str, t0: float, t1: float) -> None:
        pass

    def add_outside(self, name: str, t0: float, t1: float, mark: int) -> None:
        pass

    def mark(self) -> int:
        return 0

    def mark_first_token(self) -> None:
        pass

    def finish(self) -> None:
        pass


NO_TIMELINE = _NoTimeline()
