"""nxc_chat's wire format and turn logic, apart from Triton (the model file, nxc.triton.chat_model, only moves
tensors): request tensors -> one Pipeline.stream turn -> JSON events.

Inputs (each one element; STRING unless noted; optional ones may be left out):

    prompt           the question; refers to box k as [k]
    image            the image file's bytes in base64 (PNG, JPEG, ...), a data: URI also taken
    boxes            optional: JSON [[x1, y1, x2, y2], ...] in pixels (region input)
    max_new_tokens   optional INT32 (default: the build's)
    temperature      optional FP32 (0 = greedy, the default); top_p FP32, top_k INT32, seed INT64 likewise

Output: one STRING tensor `event` per streamed response, holding one JSON object:

    {"type": "token", "id": 773, "text": " [0]"}                    one per generated token (text: what it adds)
    {"type": "box", "index": k, "box": [x1, y1, x2, y2], "box_norm": [..], "phrase": "the red circle"}
    {"type": "done", "text", "raw_text", "token_ids", "finish_reason",
     "grounding": [{"index", "box", "box_norm", "phrase", "score", "mask": {"size": [H, W], "counts": str}}]}

box is in pixels of the image, box_norm in 0..1 of the padded square (as the model); masks are COCO RLE
(nxc.serve.rle). Over HTTP, POST /v2/models/nxc_chat/generate_stream {"prompt": ..., "image": ...} streams them
as SSE `data: {"event": "<json>", ...}`.
"""
from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Iterator

import numpy as np

from nxc.runtime.images import ImageError, load_image
from nxc.runtime.pipeline import Box, ChatResult, Done, Pipeline, Token
from nxc.prompt import PromptError
from nxc.serve.protocol import detection_json

CHAT_MODEL = "nxc_chat"
EVENT = "event"
# (name, Triton type, optional)
CHAT_INPUTS = (("prompt", "TYPE_STRING", False), ("image", "TYPE_STRING", False), ("boxes", "TYPE_STRING", True),
               ("max_new_tokens", "TYPE_INT32", True), ("temperature", "TYPE_FP32", True),
               ("top_p", "TYPE_FP32", True), ("top_k", "TYPE_INT32", True), ("seed", "TYPE_INT64", True))
_NUMBERS = {"max_new_tokens": int, "temperature": float, "top_p": float, "top_k": int, "seed": int}

# what a request can get wrong: answered with the message, the model keeps serving
REQUEST_ERRORS = (ImageError, PromptError, ValueError)


def _one(name: str, value: np.ndarray):
    if value.size != 1:
        raise ValueError(f"input {name!r} must hold one value, got shape {list(value.shape)}")
    return value.reshape(-1)[0]


def _text(name: str, value: np.ndarray) -> str:
    v = _one(name, value)
    if isinstance(v, bytes):
        try:
            return v.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"input {name!r} is not UTF-8 text") from None
    return str(v)


def decode_image(text: str):
    """base64 (or a data: URI) -> RGB PIL image; ImageError saying what is wrong."""
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("image: not base64; send the file's bytes base64-encoded (or a data: URI)") from None
    return load_image(data)


def decode_boxes(text: str):
    """JSON [[x1, y1, x2, y2], ...] -> nested lists; the pipeline checks them against the image."""
    try:
        boxes = json.loads(text)
    except json.JSONDecodeError:
        raise PromptError(f"boxes must be JSON [[x1, y1, x2, y2], ...] in pixels, got {text[:80]!r}") from None
    return boxes or None


def decode_request(get: Callable[[str], np.ndarray | None]) -> tuple[object, str, dict]:
    """(image, prompt, keyword arguments of Pipeline.stream) from `get(name)`: a request's input as an ndarray,
    None when left out."""
    values = {name: get(name) for name, _, _ in CHAT_INPUTS}
    for name, _, optional in CHAT_INPUTS:
        if values[name] is None and not optional:
            raise ValueError(f"input {name!r} is required")
    prompt = _text("prompt", values["prompt"])
    image = decode_image(_text("image", values["image"]))
    kwargs = {}
    if values["boxes"] is not None:
        kwargs["boxes"] = decode_boxes(_text("boxes", values["boxes"]))
    for name, cast in _NUMBERS.items():
        if values[name] is not None:
            kwargs[name] = cast(_one(name, values[name]))
    return image, prompt, kwargs


def _floats(v) -> list[float]:
    return [float(x) for x in np.asarray(v).reshape(-1)]


def event(ev: Token | Box | Done) -> dict:
    """A Pipeline.stream event -> the JSON object of one response."""
    if isinstance(ev, Token):
        return {"type": "token", "id": int(ev.id), "text": ev.text}
    if isinstance(ev, Box):
        d = ev.detection
        return {"type": "box", "index": ev.index, "box": _floats(d.box), "box_norm": _floats(d.box_norm),
                "phrase": d.phrase}
    r: ChatResult = ev.result
    return {"type": "done", "text": r.text, "raw_text": r.raw_text, "token_ids": [int(t) for t in r.token_ids],
            "finish_reason": r.finish_reason, "grounding": [detection_json(k, d) for k, d in enumerate(r.detections)]}


def chat_events(pipe: Pipeline, get: Callable[[str], np.ndarray | None]) -> Iterator[dict]:
    """One request's events, in order. Raises one of REQUEST_ERRORS for a request that cannot be answered (before
    any event, except a length error found while generating)."""
    image, prompt, kwargs = decode_request(get)
    for ev in pipe.stream(image, prompt, **kwargs):
        yield event(ev)


def submit_chat(pipe: Pipeline, batcher, get: Callable[[str], np.ndarray | None]):
    """The request's turn on the continuous-batching scheduler (nxc.runtime.batch): its Handle (iterate it for
    events, cancel() to free its row). Raises one of REQUEST_ERRORS now for a request that cannot be answered, and
    nxc.runtime.batch.QueueFull when too many turns wait."""
    image, prompt, kwargs = decode_request(get)
    return batcher.submit(pipe.conversation(image), prompt, **kwargs)
