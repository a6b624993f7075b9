"""A turn's checked arguments, its prompt and the reply being decoded (Conversation's and nxc.runtime.batch's).

    text, boxes, sampling args ─▶ check_args ─▶ Turn(ids, region, user text, max_new, sampling, threshold)
                                  check_boxes ─▶ [M,4] pixels ─▶ region_boxes ─▶ [K,4] normalised, slot order
"""
from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from nxc.prompt import PromptError
from nxc.runtime import preprocess as pp
from nxc.sampling import SamplingParams


@dataclass
class Turn:
    """A turn's checked arguments and prompt."""
    ids: list[int]
    region: np.ndarray
    user_text: str
    max_new: int
    sampling: SamplingParams
    threshold: float | None
    head_options: Mapping[str, object] = field(default_factory=dict)   # per head kind, checked by the kind


@dataclass
class Reply:
    """One reply being decoded."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""                              # decoded so far, literal tokens kept
    slot_end: int = 0                           # len(text) after the last emitted slot
    found: list = field(default_factory=list)   # (bound head, record) per trigger, in order
    watches: dict = field(default_factory=dict)  # bound head -> its watcher, for heads that read the tokens
    late: list = field(default_factory=list)     # events made once the reply ended (pictures, calls it closed)


def check_max_new(max_new_tokens, default: int) -> int:
    max_new = default if max_new_tokens is None else max_new_tokens
    if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or max_new < 1:
        raise ValueError(f"max_new_tokens must be a whole number >= 1 (None: the build's {default}), "
                         f"got {max_new_tokens!r}")
    return int(max_new)


def check_text(text) -> None:
    if not isinstance(text, str):
        raise PromptError(f"the prompt must be text (str), got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PromptError(f"the prompt is not valid Unicode text ({e.reason} at character {e.start}); pass the "
                          "question as UTF-8 text") from None


def check_boxes(boxes, width: int, height: int) -> np.ndarray:
    """Region-input boxes -> [M,4] float32 pixels; refuses what cannot be a box on a width x height image. A box
    that reaches past the image edge is kept (its normalised corners are clamped to the image, as the reference)."""
    if boxes is None:
        return np.zeros((0, 4), np.float32)
    try:
        b = np.asarray(boxes, np.float64)
    except (TypeError, ValueError):
        raise PromptError(f"boxes must be numbers [[x1, y1, x2, y2], ...] in pixels, got {boxes!r}") from None
    if b.size % 4 or b.ndim > 2 or (b.ndim == 2 and b.shape[1] != 4):
        raise PromptError(f"boxes must be [[x1, y1, x2, y2], ...] (4 numbers each), got shape {b.shape}")
    b = b.reshape(-1, 4)
    for k, (x1, y1, x2, y2) in enumerate(b):
        if not np.all(np.isfinite([x1, y1, x2, y2])):
            raise PromptError(f"box [{k}] {b[k].tolist()} has a non-finite coordinate")
        if x2 <= x1 or y2 <= y1:
            raise PromptError(f"box [{k}] {b[k].tolist()} is empty or reversed: x1 < x2 and y1 < y2 are "
                              "needed (xyxy pixels)")
        if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
            raise PromptError(f"box [{k}] {b[k].tolist()} lies outside the {width}x{height} image")
    return b.astype(np.float32)


def region_boxes(boxes_px: np.ndarray, order: list[int], width: int, height: int) -> np.ndarray:
    """Region-input boxes in the order their slots appear, normalised to the padded square: [K,4]."""
    return pp.normalise_boxes(boxes_px[order], width, height) if order else np.zeros((0, 4), np.float32)


def check_beams(num_beams, length_penalty, early_stopping, sampling: SamplingParams) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, (int, np.integer)) or num_beams < 1:
        raise ValueError(f"num_beams must be a whole number >= 1, got {num_beams!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be true, false or \"never\" (Hugging Face's meanings), got "
                         f"{early_stopping!r}")
    if not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    if num_beams > 1 and sampling.temperature > 0:
        raise ValueError("beam search is deterministic here: use temperature 0 with num_beams > 1 (or one beam to "
                         "sample)")


class Claim:
    """One turn at a time on a conversation: two turns interleaved on one KV cache and history corrupt both."""

    def __init__(self):
        self._busy, self._owner = threading.Lock(), None

    def take(self) -> None:
        """Start a turn or refuse at once."""
        if not self._busy.acquire(blocking=False):
            if self._owner == threading.get_ident():
                raise RuntimeError("this Conversation is still answering: finish the stream it gave (or close() it) "
                                   "before the next turn")
            raise RuntimeError("this Conversation is answering in another thread; give each thread its own "
                               "(pipe.conversation(image))")
        self._owner = threading.get_ident()

    def release(self) -> None:
        self._owner = None
        self._busy.release()


def one_turn(method):
    """Run a Conversation method (a generator: until it ends or is closed) holding the conversation's claim, so that
    a second turn started meanwhile is refused at once instead of interleaving on its cache."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def claimed(self, *args, **kwargs):
            self._claim.take()
            try:
                yield from method(self, *args, **kwargs)
            finally:
                self._claim.release()
    else:
        @functools.wraps(method)
        def claimed(self, *args, **kwargs):
            self._claim.take()
            try:
                return method(self, *args, **kwargs)
            finally:
                self._claim.release()
    return claimed
