"""Requests in, responses out: OpenAI chat messages <-> a Conversation turn, detections <-> `grounding` JSON.

Nothing here touches the network or the model: the app (nxc.serve.app) reads a body, `parse_chat` turns it into a
ChatRequest, the pipeline answers, `detection_json` / `completion` / `chunk` shape the answer.
"""
from __future__ import annotations

import base64
import binascii
import io
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from nxc import names
from nxc.runtime.images import ImageError, load_image
from nxc.runtime.pipeline import Detection
from nxc.prompt import SLOT
from nxc.serve import rle


class ApiError(Exception):
    """A request the server refuses: HTTP status, one-line message, OpenAI-style error code."""

    def __init__(self, status: int, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "code": self.code}}


@dataclass
class Limits:
    max_request_bytes: int = 20 * 1024 * 1024       # the whole JSON body (a base64 image is 4/3 of its file)
    max_image_pixels: int = 25_000_000              # decoded width x height
    max_tokens: int | None = None                   # a cap on max_tokens a client may ask (None: the build's context)
    allow_local_images: bool = False                # image_url may name a file on the server (trusted clients only)


@dataclass
class PastTurn:
    user: str
    boxes: list | None
    reply_raw: str
    reply_boxes: list


@dataclass
class ChatRequest:
    image: Image.Image | None        # None: no image part (a build that draws from the text uses a blank one)
    question: str
    boxes: list | None = None
    history: list[PastTurn] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    sampling: dict = field(default_factory=dict)    # max_new_tokens, temperature, top_p, top_k, seed
    n: int = 1                                      # completions of the turn (one prefill)
    beams: dict = field(default_factory=dict)       # num_beams, length_penalty, early_stopping (when num_beams > 1)
    draw: dict = field(default_factory=dict)        # picture options given: steps, guidance, seed, scheduler


# -- images ----------------------------------------------------------------------------------------------------
_DATA_URI = re.compile(r"^data:(?P<mime>[\w/+.-]*)(?P<params>(;[\w=.+-]+)*?)(?P<b64>;base64)?,(?P<data>.*)$", re.S)


def image_from_url(url: str, limits: Limits) -> Image.Image:
    """A data URI (or bare base64), or a local path where the server allows it -> RGB image within the limits."""
    if not isinstance(url, str) or not url:
        raise ApiError(400, "image_url.url must be a non-empty string (a data:image/...;base64,... URI)")
    if url.startswith("data:"):
        m = _DATA_URI.match(url)
        if not m or not m.group("b64"):
            raise ApiError(400, "the image data URI must be base64: data:image/png;base64,<data>")
        data = _b64(m.group("data"))
    elif url.startswith(("file://", "/", "./")):
        if not limits.allow_local_images:
            raise ApiError(400, "local image paths are not allowed by this server (start it with "
                                "--allow-local-images); send the image as a data:image/...;base64 URI")
        path = Path(url[len("file://"):] if url.startswith("file://") else url)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ApiError(400, f"{path}: cannot be read ({e.strerror or e})") from None
    elif url.startswith(("http://", "https://")):
        raise ApiError(400, "this server does not fetch images from URLs; send the image as a "
                            "data:image/...;base64 URI")
    else:
        data = _b64(url)
    return image_from_bytes(data, limits)


def media_from_url(url, limits: Limits):
    """An image_url part's image, or a video_url part's ("video", url) clip as an nxc.runtime.video.Video."""
    if not (isinstance(url, tuple) and url[0] == "video"):
        return image_from_url(url, limits)
    from nxc.runtime.video import video_from_bytes
    url = url[1]
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ApiError(400, "video_url.url must be a data URI: data:image/gif;base64,<data> or "
                            "data:video/mp4;base64,<data>")
    m = _DATA_URI.match(url)
    if not m or not m.group("b64"):
        raise ApiError(400, "the video data URI must be base64: data:video/mp4;base64,<data>")
    try:
        video = video_from_bytes(_b64(m.group("data")))
    except ImageError as e:
        raise ApiError(400, f"video: {str(e).removeprefix('<video bytes>: ')}", "bad_video") from None
    w, h = video.size
    if w * h > limits.max_image_pixels:
        raise ApiError(413, f"the video's frames are {w}x{h}, over this server's limit of "
                            f"{limits.max_image_pixels / 1e6:.1f} M pixels; resize it first", "image_too_large")
    return video


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image is not valid base64; encode the file's bytes with base64 "
                            "(data:image/png;base64,<data>)") from None


def image_from_bytes(data: bytes, limits: Limits) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as probe:       # reads the header only
            w, h = probe.size
    except Exception:
        w = h = 0                                         # load_image says what is wrong with it
    if w * h > limits.max_image_pixels:
        raise ApiError(413, f"the image is {w}x{h} = {w * h / 1e6:.1f} M pixels, over this server's limit of "
                            f"{limits.max_image_pixels / 1e6:.1f} M; resize it first", "image_too_large")
    try:
        return load_image(data)
    except ImageError as e:
        raise ApiError(400, f"image: {str(e).removeprefix('<bytes>: ')}", "bad_image") from None


# -- chat messages ---------------------------------------------------------------------------------------------
def _parts(message: dict, k: int) -> tuple[str, list[str]]:
    """(text, image urls) of one message's content: a string or a list of text / image_url parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{k}].content must be a string or a list of parts")
    texts, images = [], []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(url.get("url") if isinstance(url, dict) else url)
        elif kind == "video_url":                     # a clip instead of the image (VITRON's video input)
            url = part.get("video_url")
            images.append(("video", url.get("url") if isinstance(url, dict) else url))
        else:
            raise ApiError(400, f"messages[{k}].content[{j}]: expected a text, image_url or video_url part, got "
                                f"{kind!r}")
    return " ".join(t.strip() for t in texts if t.strip()), images


def unrender(content: str, grounding: list, k: int) -> tuple[str, list]:
    """An assistant message as returned ([i] for its i-th detection) -> (reply as decoded, normalised boxes)."""
    refs = [int(m) for m in re.findall(r"\[(\d+)\]", content)]
    if refs != list(range(len(refs))) or len(refs) != len(grounding):
        raise ApiError(400, f"messages[{k}]: the assistant reply has references {refs} but {len(grounding)} "
                            "grounding entries; send earlier assistant messages back as they were returned "
                            "(content and grounding)")
    boxes = []
    for i, det in enumerate(grounding):
        box = det.get("box_norm") if isinstance(det, dict) else None
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise ApiError(400, f"messages[{k}].grounding[{i}] needs box_norm: [x1, y1, x2, y2] in 0..1")
        boxes.append(box)
    return re.sub(r"\[(\d+)\]", lambda _: SLOT, content), boxes


def _int(body: dict, key: str, lo: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"{key} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise ApiError(400, f"{key} must be at least {lo}, got {v}")
    return v


def _float(body: dict, key: str, lo: float, hi: float) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"{key} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


MAX_N = 16          # completions one request may ask (each takes a batch row)


def sampling(body: dict, limits: Limits) -> dict:
    """OpenAI sampling fields -> Conversation.stream keyword arguments (greedy unless a temperature is given)."""
    max_new = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
    if max_new and limits.max_tokens and max_new > limits.max_tokens:
        raise ApiError(400, f"max_tokens {max_new} is over this server's limit of {limits.max_tokens}")
    out = {"max_new_tokens": max_new or limits.max_tokens, "temperature": _float(body, "temperature", 0.0, 2.0),
           "top_p": _float(body, "top_p", 0.0, 1.0), "top_k": _int(body, "top_k", 0), "seed": _int(body, "seed")}
    if out["top_p"] == 0.0:
        raise ApiError(400, "top_p must be above 0")
    return {k: v for k, v in out.items() if v is not None}


def completions_and_beams(body: dict, sampled: dict) -> tuple[int, dict]:
    """`n` (OpenAI's) and nxc's `num_beams`, `length_penalty`, `early_stopping` (Hugging Face's meanings)."""
    n = _int(body, "n", 1) or 1
    if n > MAX_N:
        raise ApiError(400, f"n must be at most {MAX_N}, got {n}")
    beams = _int(body, "num_beams", 1) or 1
    if beams == 1:
        if body.get("length_penalty") is not None or body.get("early_stopping") is not None:
            raise ApiError(400, "length_penalty and early_stopping apply to beam search: set num_beams > 1")
        return n, {}
    if n > 1:
        raise ApiError(400, "n > 1 and num_beams > 1 do not combine: beam search gives one answer")
    if sampled.get("temperature"):
        raise ApiError(400, "beam search is deterministic here: leave temperature at 0 with num_beams > 1")
    early = body.get("early_stopping", False)
    if early not in (True, False, "never"):
        raise ApiError(400, f'early_stopping must be true, false or "never", got {early!r}')
    lp = _float(body, "length_penalty", -100.0, 100.0)
    return n, {"num_beams": beams, "length_penalty": 1.0 if lp is None else lp, "early_stopping": early}


def _boxes(value, where: str):
    if value is None:
        return None
    if not isinstance(value, list):
        raise ApiError(400, f"{where} must be a list of [x1, y1, x2, y2] pixel boxes")
    return value


def parse_chat(body, limits: Limits) -> ChatRequest:
    """An OpenAI chat-completions body -> ChatRequest, or ApiError(400) saying what is wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects")
    turns, image_urls = [], []
    for k, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role in ("system", "developer"):
            continue                      # the model's system prompt is fixed (vicuna v1.1); documented in README
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages[{k}].role must be user or assistant, got {role!r}")
        text, urls = _parts(msg, k)
        if role == "assistant":
            urls = []                     # the pictures an earlier reply made: nothing of them is fed back
        if urls and (role != "user" or turns):
            raise ApiError(400, f"messages[{k}]: the image goes in the first user message only (one image per "
                                "conversation)")
        image_urls += urls
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ApiError(400, f"messages[{k}]: expected a {expected} message (user and assistant alternate, "
                                "starting and ending with user)")
        turns.append((role, text, msg, k))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be the user's question")
    if len(image_urls) > 1:
        raise ApiError(400, "the first user message takes one image content part "
                            '({"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}); '
                            f"got {len(image_urls)}")
    history = []
    for (_, user, umsg, uk), (_, reply, amsg, ak) in zip(turns[0:-1:2], turns[1::2]):
        grounding = amsg.get("grounding") or []
        if not isinstance(grounding, list):
            raise ApiError(400, f"messages[{ak}].grounding must be a list")
        raw, boxes = unrender(reply, grounding, ak)
        history.append(PastTurn(user, _boxes(umsg.get("boxes"), f"messages[{uk}].boxes"), raw, boxes))
    last = turns[-1][2]
    boxes = _boxes(last.get("boxes", body.get("boxes")), "boxes")
    stream_options = body.get("stream_options") or {}
    sampled = sampling(body, limits)
    n, beams = completions_and_beams(body, sampled)
    if n > 1 and body.get("stream"):
        raise ApiError(400, "n > 1 is answered whole, not streamed: leave stream false (or ask n streams of 1)")
    return ChatRequest(image=media_from_url(image_urls[0], limits) if image_urls else None, question=turns[-1][1],
                       boxes=boxes,
                       history=history, stream=bool(body.get("stream")),
                       include_usage=bool(isinstance(stream_options, dict) and stream_options.get("include_usage")),
                       sampling=sampled, n=n, beams=beams, draw=picture_options(body))


def parse_ground(body, limits: Limits) -> ChatRequest:
    """The native /v1/ground body {"image", "prompt", "boxes"?, sampling fields} -> ChatRequest."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if not isinstance(body.get("prompt"), str):
        raise ApiError(400, 'prompt must be a string, e.g. "Where is the red circle?"')
    if not isinstance(body.get("image"), str):
        raise ApiError(400, "image must be a string: base64 of the file, or a data:image/...;base64 URI")
    sampled = sampling(body, limits)
    n, beams = completions_and_beams(body, sampled)
    if n > 1:
        raise ApiError(400, "n > 1 is for /v1/chat/completions; /v1/ground answers once")
    return ChatRequest(image=image_from_url(body["image"], limits), question=body["prompt"],
                       boxes=_boxes(body.get("boxes"), "boxes"), sampling=sampled, beams=beams,
                       draw=picture_options(body))


# -- pictures (a build that draws: signal tokens -> projector -> generator) --------------------------------------
PICTURE_FIELDS = {"image_steps": "steps", "image_guidance": "guidance", "image_seed": "seed",
                  "image_scheduler": "scheduler"}
MAX_IMAGE_STEPS = 1000          # a scheduler's training timesteps: no sampler takes more


def picture_options(body: dict) -> dict:
    """nxc's image_steps, image_guidance, image_seed, image_scheduler -> the signal head's options (those given);
    whether the build draws at all is the server's to check."""
    steps = _int(body, "image_steps", 1)
    if steps is not None and steps > MAX_IMAGE_STEPS:
        raise ApiError(400, f"image_steps must be at most {MAX_IMAGE_STEPS}, got {steps}")
    scheduler = body.get("image_scheduler")
    if scheduler is not None and scheduler not in names.GENERATOR_SCHEDULERS:
        raise ApiError(400, f"image_scheduler must be one of {', '.join(names.GENERATOR_SCHEDULERS)}, "
                            f"got {scheduler!r}")
    out = {"steps": steps, "guidance": _float(body, "image_guidance", 0.0, 100.0),
           "seed": _int(body, "image_seed", 0), "scheduler": scheduler}
    return {k: v for k, v in out.items() if v is not None}


def picture_png(pixels: np.ndarray) -> str:
    """[H,W,3] uint8 RGB -> a data:image/png;base64 URI (lossless: it decodes to the same pixels)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, np.uint8), "RGB").save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def picture_json(im) -> dict:
    """A picture's nxc fields: index k (its image_url part is the k-th), how it was drawn, its size in pixels."""
    h, w = im.pixels.shape[:2]
    return {"index": im.index, "width": w, "height": h, "seed": im.seed, "steps": im.steps,
            "guidance": round(float(im.guidance), 4), "scheduler": im.scheduler}


def picture_part(im) -> dict:
    """An OpenAI image_url content part of the picture (base64 PNG), with its nxc fields beside it."""
    return {"type": "image_url", "image_url": {"url": picture_png(im.pixels)}, **picture_json(im)}


def message(r) -> dict:
    """The assistant message of a result: content is the text, or content parts (the text, then one image_url
    part per picture) with the pictures' nxc fields in "images" when the reply drew."""
    out = {"role": "assistant", "content": r.text,
           "grounding": [detection_json(k, d) for k, d in enumerate(r.detections)]}
    if r.calls:
        from nxc.runtime.modules import calls_json
        out["calls"] = calls_json(r)
    if r.images:
        out["content"] = [{"type": "text", "text": r.text}] + [
            {"type": "image_url", "image_url": {"url": picture_png(im.pixels)}} for im in r.images]
        out["images"] = [picture_json(im) for im in r.images]
    return out


# -- responses -------------------------------------------------------------------------------------------------
def _floats(a) -> list[float]:
    return [round(float(v), 4) for v in np.asarray(a).ravel()]


def detection_json(k: int, d: Detection, *, with_mask: bool = True) -> dict:
    out = {"index": k, "box": _floats(d.box), "box_norm": [float(v) for v in np.asarray(d.box_norm, np.float64)],
           "phrase": d.phrase, "score": None if d.score is None else round(float(d.score), 4), "mask": None}
    if with_mask and d.mask is not None:
        out["mask"] = rle.encode(d.mask)
    return out


def new_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, results, created: int | None = None) -> dict:
    """One result or the n of one request (the prompt counted once in usage)."""
    results = results if isinstance(results, list) else [results]
    return {"id": cid, "object": "chat.completion", "created": created or int(time.time()), "model": model,
            "choices": [{"index": i, "finish_reason": r.finish_reason, "token_ids": r.token_ids,
                         "message": message(r)} for i, r in enumerate(results)],
            "usage": usage(len(results[0].prompt_ids), sum(len(r.token_ids) for r in results))}


def chunk(cid: str, model: str, created: int, delta: dict, *, token_ids=(), finish_reason=None) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "token_ids": list(token_ids), "finish_reason": finish_reason}]}
