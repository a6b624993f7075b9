"""Trigger-token dispatch as data: the build manifest's `heads`, bound to token ids and graphs (DESIGN "Trigger-token
dispatch"). A new head is a manifest entry (and, for new behaviour, a kind: a module of nxc.runtime.heads), never a
new branch in the decode loop.

    manifest head                                   kind (nxc.runtime.heads.<kind>)
    trigger <at> ─▶ graph loc_heads                 "box": what the outputs mean (a Detection: pixel box,
      inputs  {hidden: hidden, boxes: zeros}          phrase), the event streamed (Box), the slot value kept for
      collect [box, seg_prompt]                       later turns (box_norm), the finish stage run once per
      feedback feedback ─▶ next input, emit <boxes>   reply ("sam_masks": SAM decoder for all its detections) and
      encode  boxes ─▶ loc_embeds (the emitted slot's   what it keeps per image (the SAM embedding)
              input rows for region boxes and earlier replies)

    triggers = Dispatch(pipe).triggers          # {trigger id: BoundHead}; BoundHead([hidden]) -> [(emit, x, Found)]
"""
from __future__ import annotations

import numpy as np

from nxc import names
from nxc.manifest import BuildError, Head
from nxc.runtime.events import Box, Detection  # noqa: F401  (re-exported: the kinds' records and events)
from nxc.runtime.heads import KINDS, Found, HeadKind, HeadState, kind_class, known_kinds, register  # noqa: F401
from nxc.runtime.heads.box import BoxKind  # noqa: F401  (re-exported: a kind to derive from)


class BoundHead:
    """A manifest head with its token ids, its graph's zero inputs and its kind."""

    def __init__(self, head: Head, pipe, index: int):
        kind = kind_class(head.kind)
        if kind is None:
            raise BuildError(f"{pipe.manifest.root / 'manifest.json'}: heads[{index}].kind {head.kind!r} is not a kind "
                             f"this runtime knows ({', '.join(known_kinds())}); use the nxc that wrote the build")
        self.head, self.pipe = head, pipe
        self.trigger = None if head.trigger is None else pipe.manifest.token_id(head.trigger)
        self.emit = pipe.manifest.token_id(head.emit)
        self.signals = [pipe.manifest.token_id(t) for t in head.signals]
        self.stage = head.graph            # the timeline stage of a call (nxc-profile)
        self.kind = kind(head, pipe)
        self.kind.bound = self             # the kind's own head (its graph's feeds: BoundHead.run)
        spec = pipe.manifest.graph_spec(head.graph)
        self._zeros = {t.name: np.zeros(t.resolve({a: 1 for a in t.dynamic_axes().values()}), t.dtype)
                       for t in spec.inputs}

    def __call__(self, hiddens: list[np.ndarray]) -> list[tuple[int, np.ndarray, Found]]:
        """The fed token of each row was this head's trigger and gave its hidden [1,H]: one graph call for all the
        rows -> per row (emitted token, next input [1,1,H], what it found)."""
        h = self.head
        stacked = np.concatenate([np.asarray(x, np.float32).reshape(1, -1) for x in hiddens])
        feeds = {name: stacked if source == "hidden" else self._zeros[name] for name, source in h.inputs.items()}
        outs = self.pipe.run(h.graph, **feeds)
        return [(self.emit, outs[h.feedback][i][None, None], Found(self, {k: outs[k][i] for k in h.collect}))
                for i in range(len(hiddens))]

    def steps(self) -> dict:
        """{token id: what the decode loop calls when that token was fed}: the trigger -> this head; for a head of
        signal tokens each signal -> a SignalStep (the next signal is emitted, the last emits None)."""
        if self.signals:
            return {t: SignalStep(self, k) for k, t in enumerate(self.signals)}
        return {} if self.trigger is None else {self.trigger: self}

    def run(self, feeds_by_source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The head's graph with each input fed from its source (`feeds_by_source`: {source: array}; "zeros" are
        the graph's zero inputs)."""
        h = self.head
        feeds = {name: self._zeros[name] if source == "zeros" else feeds_by_source[source]
                 for name, source in h.inputs.items()}
        return self.pipe.run(h.graph, **feeds)

    def encode(self, values: np.ndarray, conv=None, slots=None) -> np.ndarray:
        """[k, ...] slot values -> [k, H] input rows of the emitted slot token (region input, earlier replies, a
        retrieval prompt's objects). Inputs fed from "<graph>:<output>" come from `conv`'s once-per-image runs,
        "slot_index" inputs are `slots` (each value's place among the prompt's slots)."""
        h = self.head
        if h.encode_input is None:
            raise BuildError(f"head {h.kind!r} has no encode graph input; its slots cannot be fed back")

        def feed(name: str, source: str) -> np.ndarray:
            if ":" in source:
                return self.kind.image_input(conv, source)
            if source == "slot_index":
                return np.asarray(slots, np.int64)
            if source == "slot_is_region":
                return np.asarray([conv.slot_is_region(k) for k in slots], np.int64)
            return self._zeros[name]
        feeds = {name: feed(name, source) for name, source in h.inputs.items()}
        feeds[h.encode_input] = np.asarray(values, self._zeros[h.encode_input].dtype)
        return self.pipe.run(h.graph, **feeds)[h.encode_output]


class SignalStep:
    """Signal token k of a head's signals was fed (NExT-GPT's [IMGk]): keep its hidden; the next signal follows
    (emitted, never sampled; its input is its own embedding row), after the last the row samples as usual."""

    stage = "decode"                       # no graph runs: the hidden is only kept

    def __init__(self, bound: BoundHead, k: int):
        self.bound, self.k = bound, k
        self.next = bound.signals[k + 1] if k + 1 < len(bound.signals) else None

    def __call__(self, hiddens: list[np.ndarray]) -> list[tuple[int | None, None, Found]]:
        return [(self.next, None, Found(self.bound, {"signal": np.int64(self.k),
                                                     "hidden": np.asarray(h, np.float32).reshape(-1)}))
                for h in hiddens]


class Dispatch:
    """The build's heads, bound. `triggers`: {trigger id: BoundHead}; `slot_head`: the head whose emitted slot
    carries region input (the first with an encode graph), or None."""

    def __init__(self, pipe):
        self.heads = [BoundHead(h, pipe, i) for i, h in enumerate(pipe.manifest.heads)]
        if pipe.manifest.modules is not None:          # the module-call table: one more part that watches the reply
            from nxc.runtime.modules import BoundModules
            self.heads.append(BoundModules(pipe))
        self._by_kind = {}
        for b in self.heads:
            self._by_kind.setdefault(b.head.kind, b)
        self.triggers = {t: step for b in self.heads for t, step in b.steps().items()}
        # heads that read the reply's tokens (their kind has a watcher): the only ones _on_token asks each token
        self.watchers = [b for b in self.heads if type(b.kind).watch is not HeadKind.watch]
        self.slot_head = next((b for b in self.heads if b.head.encode_input), None)
        # Never sampled (nxc.sampling.pick_token's `banned`): a head's emitted slot comes only after its trigger,
        # and the image span only where the prompt puts it; the reference bans the same ids (TokenIds.never_sampled).
        emitted = {b.emit for b in self.heads if b.emit is not None} | {t for b in self.heads for t in b.signals[1:]}
        self.never_sampled = tuple(sorted(emitted | {
            pipe.manifest.token_id(t) for t in (names.IM_START, names.IM_PATCH, names.IM_END)}))

    def head_of_kind(self, kind: str) -> BoundHead | None:
        """The build's (first) head of `kind`, or None: e.g. head_of_kind("index") tells a retrieval build."""
        return self._by_kind.get(kind)
