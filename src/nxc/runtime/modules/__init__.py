"""Module calls at run time (issue 29): the manifest's `modules` table bound to backends, read from the reply as it
streams. One module per backend, named as the backend (`modules/segment.py` is `"backend": "segment"`), imported the
first time a build names it; a new backend is a module here plus names.MODULE_BACKENDS, never a branch in the
decode loop or in Conversation.

    reply text ─▶ nxc.module_calls.ModuleCallParser ─▶ a complete call ─▶ modules table: module -> backend
        ─▶ backend.run(conv, call, region box) ─▶ CallResult (detection, pictures) + its event (Mask), at once
        unknown module, bad region, malformed or unclosed tags ─▶ CallResult with `error` (the reply stays text)

The modules table is bound as one more part of the dispatch (BoundModules: a head with no trigger and no graph whose
kind, "module", watches the reply), so Conversation streams, finishes and renders it like any watching head.
ChatResult.calls holds every call's CallResult, in order; a segmentation's Detection is in ChatResult.detections too.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field

import numpy as np

from nxc.manifest_types import BuildError, Head
from nxc.module_calls import CallError, ModuleCall, ModuleCallParser
from nxc.runtime.events import Detection
from nxc.runtime.heads import HeadKind, HeadState

BACKENDS: dict[str, type["Backend"]] = {}


def backend(name: str):
    """Class decorator: the runtime backend of manifest modules of `"backend": name`."""
    def add(cls):
        BACKENDS[name] = cls
        return cls
    return add


def backend_class(name: str) -> type["Backend"]:
    if name not in BACKENDS:
        importlib.import_module(f"{__name__}.{name}")
    return BACKENDS[name]


@dataclass
class CallResult:
    """One module call of a reply: what was written (`call`, None when the tags themselves were wrong), the module's
    task and backend, and what it made, or `error`: why nothing ran (the reply stays text)."""
    index: int                            # the reply's k-th call (errors included)
    call: ModuleCall | None
    module: str | None = None
    task: str | None = None
    backend: str | None = None
    detection: Detection | None = None    # segmentation: the region's box and its mask
    images: list = field(default_factory=list)   # generation: the pictures (Image) it drew
    track: list = field(default_factory=list)    # video segmentation: a Detection per frame (frame 0 = detection)
    box: np.ndarray | None = None         # the region the backend got, pixels in its frame (numbers, [k] or <at>)
    error: str | None = None
    note: str | None = None               # what the backend did not do with the call (an unused region)
    picture_base: int = 0                 # pictures the reply made before this call (the first one's index)


def calls_json(result) -> list[dict]:
    """A ChatResult's module calls as JSON (nxc-run --json, nxc-serve): what was called, with what, and what it made
    ("detection": the index of its detection in the result's detections / grounding) or why it did not run."""
    out = []
    for c in result.calls:
        call = c.call
        out.append({"index": c.index, "module": c.module if call is None else call.module, "task": c.task,
                    "backend": c.backend, "instructions": list(call.instructions) if call else [],
                    "region": None if call is None or call.region is None else list(call.region),
                    "region_input": None if call is None else call.region_ref,
                    "box": None if c.box is None else [round(float(v), 2) for v in c.box],
                    "detection": next((k for k, d in enumerate(result.detections) if d is c.detection), None),
                    "pictures": [im.index for im in c.images],
                    "track": [[round(float(v), 2) for v in d.box] for d in c.track], "error": c.error, "note": c.note})
    return out


@dataclass
class Track:
    """Streamed when a video segmentation call is done: the region's object in every frame (a Detection each)."""
    index: int
    detections: list
    call: CallResult


@dataclass
class Mask:
    """Streamed when a segmentation call is done: its detection (box = the region, mask, score)."""
    index: int
    detection: Detection
    call: CallResult


class Backend:
    """What a module's backend does with a complete call: run(conv, call, box_px) -> CallResult fields; raise
    CallFailed(reason) for what the call asks that cannot be done (the reply stays text, the reason in the result)."""

    def __init__(self, pipe):
        self.pipe = pipe

    def run(self, conv, call: ModuleCall, box_px: np.ndarray | None, result: CallResult):
        raise NotImplementedError

    def region_box(self, conv, region, frame: str) -> np.ndarray:
        """The region's numbers as a pixel box [4] on the conversation's image (manifest modules.region: "pixels"
        as written, "norm" x width / height); a box that leaves the image is refused. A backend that draws a new
        picture reads the region in that picture's frame instead (Generate)."""
        return frame_box(region, frame, conv.width, conv.height, "image")

    def event(self, result: CallResult):
        return None


class CallFailed(ValueError):
    """A call that cannot run: its message is the result's error."""


def frame_box(region, frame: str, width: int, height: int, what: str) -> np.ndarray:
    """A region (xyxy: pixels of a width x height `what`, or fractions of its sides; the parser has checked x1 < x2
    and y1 < y2) as pixels [4]; CallFailed for a box that leaves it."""
    box = np.asarray(region, np.float32)
    if frame == "norm":
        box = box * np.asarray([width, height, width, height], np.float32)
    if box[0] < 0 or box[1] < 0 or box[2] > width or box[3] > height:
        raise CallFailed(f"region {list(region)} is outside the {width} x {height} {what} (xyxy, "
                         f"{'pixels' if frame == 'pixels' else 'fractions of the side'})")
    return box


class ModuleState(HeadState):
    """What the backends keep for the conversation's image (a backend's once-per-image graph outputs)."""

    def __init__(self, conv, shared: dict | None = None):
        super().__init__(conv)
        self.shared = shared if shared is not None else {}

    def twin(self, conv) -> "ModuleState":
        return ModuleState(conv, self.shared)


class ModulesKind(HeadKind):
    """The "module" part: watches the reply's text, runs each complete call's backend."""

    detections = False

    def __init__(self, head, pipe):
        super().__init__(head, pipe)
        self.table = pipe.manifest.modules
        self.backends = {b: backend_class(b)(pipe) for b in {e.backend for e in self.table.calls.values()}}

    def new_state(self, conv) -> ModuleState:
        return ModuleState(conv)

    def watch(self, conv, reply):
        kind, parser = self, ModuleCallParser()

        class Watch:
            count = pictures = 0
            found = reply.found               # the reply's (head, record) per trigger: a grounded region's box

            def feed(self, token: int) -> list:
                return [kind.run(conv, c, self) for c in parser.feed(reply.text)]

            def close(self) -> list:
                return [kind.run(conv, c, self) for c in parser.close()]
        return Watch()

    def run(self, conv, call: ModuleCall | CallError, watch) -> CallResult:
        result = CallResult(index=watch.count, call=call if isinstance(call, ModuleCall) else None,
                            picture_base=watch.pictures)
        watch.count += 1
        if isinstance(call, CallError):
            result.error = call.reason
            return result
        entry = self.table.calls.get(call.module)
        if entry is None:
            result.error = (f"module {call.module!r} is not one this build has "
                            f"({', '.join(sorted(self.table.calls))})")
            return result
        result.module, result.task, result.backend = call.module, entry.task, entry.backend
        try:
            backend = self.backends[entry.backend]
            box = self.region(conv, call, backend, watch)
            result.box = box
            backend.run(conv, call, box, result)    # its graphs timed as their own stages
        except (CallFailed, BuildError) as e:
            result.error = str(e)
        watch.pictures += len(result.images)
        return result

    def region(self, conv, call: ModuleCall, backend: "Backend", watch) -> np.ndarray | None:
        """The call's region as pixels in the backend's frame: its numbers (in the table's frame), the turn's region
        input [k], or the box the reply's box head decoded at the region's trigger (both fractions of the
        conversation's image, read in the backend's frame)."""
        if call.region is not None:
            return backend.region_box(conv, call.region, self.table.region)
        w, h = conv.width, conv.height
        if call.region_ref is not None:
            boxes = conv.turn_boxes
            if call.region_ref >= len(boxes):
                raise CallFailed(f"region [{call.region_ref}] names a region input this turn does not have (it has "
                                 f"{len(boxes)}: pass boxes with the question)")
            return backend.region_box(conv, boxes[call.region_ref] / np.asarray([w, h, w, h], np.float32), "norm")
        if call.region_slot is not None:
            found = [r for _, r in watch.found if isinstance(r, Detection)]
            if call.region_slot >= len(found):
                raise CallFailed("the region's trigger decoded no box (this build has no box head, or the trigger "
                                 "was not its)")
            box = found[call.region_slot].box / np.asarray([w, h, w, h], np.float32)
            return backend.region_box(conv, np.clip(box, 0, 1), "norm")
        return None

    def detections_of(self, record: CallResult) -> list:
        return [] if record.detection is None else [record.detection]

    def event(self, index, record: CallResult):
        if record.error is not None or record.backend is None:
            return None
        return self.backends[record.backend].event(record)

    def finish(self, conv, records, turn):
        return []

    def slot_value(self, record):
        return None


class BoundModules:
    """The modules table as a part of the dispatch: no trigger, no graph, a watcher (BoundHead's interface)."""

    def __init__(self, pipe):
        self.head = Head(kind="module", trigger=None, emit="", graph="", inputs={}, collect=(), feedback=None,
                         finish=None, encode_input=None, encode_output=None)
        self.pipe = pipe
        self.trigger, self.emit, self.signals, self.stage = None, None, [], "module"
        self.kind = ModulesKind(self.head, pipe)
        self.kind.bound = self

    def steps(self) -> dict:
        return {}
