"""Head kinds: what a manifest head's outputs mean. One module per kind, named as the kind (`heads/box.py` is
`"kind": "box"`), imported the first time a build names it; a new kind is a new module here plus its manifest
entry, never a branch in the decode loop or in `Conversation`.

    a kind (HeadKind subclass, @register("name"))
      per trigger   record(conv, outputs, text) ─▶ the reply's record; event(k, record) ─▶ streamed (Box)
      per token     watch(conv, reply) ─▶ a watcher whose feed(token) gives records (heads with no trigger)
      per reply     finish(conv, records, turn) ─▶ events it made (SAM masks on its records; Image);
                    render(text, watch) ─▶ the reply as shown (signal tokens hidden)
      per turn      slot_value(record) ─▶ fed back into the emitted slot of later turns
      per image     new_state(conv) ─▶ what the kind keeps for the conversation's image (SAM embedding,
                    proposals): conv.state(kind); prepare(conv) before a turn's prompt; prompt_format(conv);
                    image_input(conv, "graph:output") for the head's encode graph
      per turn      check_options(options) ─▶ the turn's options for this kind (stream(head_options={kind: ...}))
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from nxc.manifest import BuildError, Head

KINDS: dict[str, type["HeadKind"]] = {}
PATCH_FEATURES = "vision:patch_features"      # a head input source: the tower's patches (VITRON's region extractor)


def register(name: str):
    """Class decorator: make a HeadKind available to manifest heads of `"kind": name`."""
    def add(cls):
        KINDS[name] = cls
        return cls
    return add


def kind_class(name: str) -> type["HeadKind"] | None:
    """The registered kind `name`, importing its module (nxc.runtime.heads.<name>) the first time; None if there is
    no such kind."""
    if name not in KINDS and name.isidentifier():
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    return KINDS.get(name)


def known_kinds() -> list[str]:
    """Every kind this runtime has: registered ones and the modules of this package."""
    from importlib.resources import files
    mods = {p.name[:-3] for p in files(__name__).iterdir() if p.name.endswith(".py") and not p.name.startswith("_")}
    return sorted(mods | set(KINDS))


@dataclass
class Found:
    head: object                       # the BoundHead that fired
    outputs: dict[str, np.ndarray]     # the collected outputs of this trigger, first row of each


class HeadState:
    """What a kind keeps for one conversation's image (made on first use by conv.state(kind))."""

    def __init__(self, conv):
        self.conv = conv

    def twin(self, conv) -> "HeadState":
        """The state of another conversation on the same image (n completions of one turn): shares what this one
        computed, so that no once-per-image graph runs twice."""
        raise NotImplementedError


class HeadKind:
    """What a head's outputs mean. One instance per head of a loaded build."""

    detections = True                  # its records are ChatResult.detections (False: they only feed finish)

    def __init__(self, head: Head, pipe):
        self.head, self.pipe = head, pipe
        self.name = head.kind          # its key in conv.state() and in a turn's head_options
        self.bound = None              # its BoundHead (nxc.runtime.dispatch sets it)

    def record(self, conv, outputs: dict[str, np.ndarray], text_before: str):
        """The reply's record of one trigger (`text_before`: the reply text since the previous slot)."""
        raise NotImplementedError

    def detections_of(self, record) -> list:
        """What of a record goes to ChatResult.detections: the record itself, or nothing (detections False)."""
        return [record] if self.detections else []

    def event(self, index: int, record):
        """What `stream` yields when the trigger fires (None: nothing)."""
        return None

    def slot_value(self, record) -> np.ndarray | None:
        """The value a later turn encodes into this trigger's emitted slot (through the head's encode graph); None:
        nothing is fed back."""
        raise NotImplementedError

    def finish(self, conv, records: list, turn) -> list:
        """Once per reply, after the last token, for this head's records (e.g. SAM masks on them); -> the events it
        made (Image), streamed before Done and kept in the result. `turn`: nxc.runtime.turn.Turn."""
        return []

    def check_options(self, options) -> object:
        """A turn's options for this kind (stream(head_options={kind: options})), checked before the turn runs
        (one-line ValueError); the value finish finds in turn.head_options[kind]."""
        raise ValueError(f"a {self.name!r} head takes no options, got {options!r}")

    def watch(self, conv, reply) -> "object | None":
        """A head that reads the reply's tokens as they come (no trigger): an object with feed(token) -> the
        records the token completes; None for a head fired by its trigger."""
        return None

    def render(self, text: str, watch) -> str:
        """The reply as shown (after nxc.prompt.render_reply; ChatResult.raw_text keeps what was generated), for
        every head of the build: `watch` is its watcher for a head that watched the reply, else None."""
        return text

    # -- the conversation's image ----------------------------------------------------------------------
    def new_state(self, conv) -> HeadState | None:
        """What this kind keeps for `conv`'s image (conv.state(kind) makes it once); None: nothing."""
        return None

    def prepare(self, conv) -> None:
        """Before a turn's prompt is made: the once-per-image graphs the prompt needs (timed as their own stages)."""

    def prompt_format(self, conv):
        """The grounding format of the prompt (nxc.prompt.PromptFormat) if this kind sets it, else None."""
        return None

    def image_input(self, conv, source: str) -> np.ndarray:
        """A head input fed from a once-per-image graph output (`"graph:output"`, e.g. "proposals:features"); the
        vision graph's patch features (a region extractor's build) are the conversation's."""
        if source == PATCH_FEATURES:
            return conv.patch_features()[None]
        raise BuildError(f"{self.pipe.manifest.root}: a head input comes from {source!r}, which this runtime does not "
                         "know; use the nxc that wrote the build")
