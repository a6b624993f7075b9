"""The torch-free NExT-Chat pipeline: a build directory in, text + boxes + masks out.

    pipe = Pipeline.load("build/fp32")                      # backend="onnxruntime" | "tensorrt"
    r = pipe.chat(image, "Where is the red circle?")        # r.text "Answer: [0] .", r.detections[0].box / .mask
    conv = pipe.conversation(image)                          # keeps the image features and the KV cache
    conv.ask("Where is the red circle?"); conv.ask("And the blue square?")   # no re-encoding, no re-prefill
    for ev in pipe.stream(image, "Describe the image with locations."): ...  # Token / Box events, then Done

Threading: a Pipeline (its sessions) may be shared by threads; a Conversation belongs to one thread at a time.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from nxc import names
from nxc.manifest import Manifest, load_manifest
from nxc.runtime import preprocess as pp
from nxc.runtime.kv_cache import KVCache
from nxc.prompt import (SLOT, PromptError, Turn, build_prompt, check_all_boxes_used, expand_region_refs,
                               render_reply)
from nxc.runtime.timing import NO_TIMELINE, Timeline
from nxc.runtime.tokenizer import Tokenizer
from nxc.sampling import SamplingParams, pick_token


@dataclass
class Detection:
    box: np.ndarray            # [4] xyxy pixels on the original image (not clamped, as the reference)
    box_norm: np.ndarray       # [4] normalised xyxy in the padded square (what loc_decoder gave)
    phrase: str                # the reply text this detection follows, e.g. "a blue circle"
    mask: np.ndarray | None = None    # [H,W] bool (all False when the mask score is under the threshold)
    score: float | None = None        # SAM's IoU prediction for the mask


@dataclass
class ChatResult:
    text: str                  # reply with each `<at> <boxes>` rendered as [k]
    raw_text: str              # reply as decoded, with the literal tokens
    token_ids: list[int]       # generated ids (`<boxes>` after every `<at>`)
    prompt_ids: list[int]      # the whole conversation's ids for this turn
    finish_reason: str         # "stop" (</s>) or "length" (max_new_tokens or the build's context)
    detections: list[Detection] = field(default_factory=list)


@dataclass
class Token:
    id: int
    text: str                  # decoded text this token adds


@dataclass
class Box:
    index: int
    detection: Detection       # box known now; mask and score come with Done


@dataclass
class Done:
    result: ChatResult


class Pipeline:
    """A loaded build. Graph runners are created on first use (SAM only when a trigger fires)."""

    def __init__(self, *, manifest: Manifest, tokenizer: Tokenizer, backend):
        self.manifest, self.tokenizer, self.backend = manifest, tokenizer, backend
        m = manifest.data
        self.config = m["config"]
        self.tokens = m["tokens"]
        self.embeddings = np.load(manifest.path(m["embeddings"]["file"]), mmap_mode="r")
        self.kv_dtype = np.dtype(m.get("kv_cache", {}).get("dtype", "float32"))
        self._runners: dict = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, build_dir: str | Path, backend: str = "onnxruntime", providers: list[str] | None = None,
             *, threads: int | None = None, verify: bool = True) -> "Pipeline":
        from nxc.runtime.backends import get_backend
        manifest = load_manifest(build_dir, verify=verify)
        tokenizer = Tokenizer.from_file(manifest.path(manifest.data["tokenizer"]["file"]))
        return cls(manifest=manifest, tokenizer=tokenizer,
                   backend=get_backend(backend, providers=providers, threads=threads))

    def runner(self, graph: str):
        with self._lock:
            if graph not in self._runners:
                self._runners[graph] = self.backend.load(self.manifest.graph_path(graph), self.manifest.graph_spec(graph))
            return self._runners[graph]

    def run(self, graph: str, **feeds) -> dict[str, np.ndarray]:
        return self.runner(graph).run(feeds)

    # -- the public calls ------------------------------------------------------------------------------
    def conversation(self, image: Image.Image) -> "Conversation":
        return Conversation(self, image)

    def chat(self, image: Image.Image, text: str, boxes=None, **kwargs) -> ChatResult:
        return self.conversation(image).ask(text, boxes=boxes, **kwargs)

    def stream(self, image: Image.Image, text: str, boxes=None, **kwargs) -> Iterator[Token | Box | Done]:
        return self.conversation(image).stream(text, boxes=boxes, **kwargs)


def _phrase(text_before: str) -> str:
    """The words a detection follows: the reply text since the previous slot, last clause, without 'and'."""
    text_before = text_before.replace(names.AT, "")
    for sep in (".", ",", ";", ":", "\n"):
        text_before = text_before.split(sep)[-1]
    words = text_before.strip().split()
    if words and words[0].lower() == "and":
        words = words[1:]
    return " ".join(words)


class Conversation:
    """One image, several turns. Keeps the image features, the SAM image embedding (once a trigger fired) and the
    KV cache of everything said so far; a turn feeds only what the cache does not hold yet."""

    def __init__(self, pipe: Pipeline, image: Image.Image):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}; load it with nxc.runtime.images")
        self.pipe = pipe
        self.image = image.convert("RGB")
        self.width, self.height = self.image.size
        llm = pipe.config["llm"]
        self.cache = KVCache(num_layers=llm["num_layers"], num_kv_heads=llm["num_kv_heads"],
                             head_dim=llm["hidden_size"] // llm["num_heads"],
                             capacity=pipe.manifest.data["max_context"], dtype=pipe.kv_dtype)
        self.cached_ids: list[int] = []
        self.history: list[Turn] = []
        self.history_boxes: list[np.ndarray] = []     # normalised box of every <boxes> slot so far, in order
        self._features: np.ndarray | None = None
        self._sam_embedding: np.ndarray | None = None
        self._tl = NO_TIMELINE

    # -- graph calls -----------------------------------------------------------------------------------
    def features(self) -> np.ndarray:
        if self._features is None:
            size = self.pipe.manifest.data["preprocess"]["clip"]["size"]
            pre = self.pipe.manifest.data["preprocess"]["clip"]
            with self._tl.stage("preprocess"):
                px = pp.clip_pixels(self.image, size, mean=pre["mean"], std=pre["std"])
            with self._tl.stage("vision"):
                self._features = self.pipe.run(names.GRAPH_VISION, pixel_values=px)["image_embeds"][0]
        return self._features

    def sam_embedding(self) -> np.ndarray:
        if self._sam_embedding is None:
            pre = self.pipe.manifest.data["preprocess"]["sam"]
            with self._tl.stage("preprocess"):
                px = pp.sam_pixels(self.image, pre["size"], mean=pre["mean"], std=pre["std"])
            with self._tl.stage("sam_encoder"):
                self._sam_embedding = self.pipe.run(names.GRAPH_SAM_ENCODER, image=px)["image_embedding"]
        return self._sam_embedding

    def _llm(self, embeds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed [1,T,H] embeddings after the cache; returns last logits [V] and hidden [1,H]."""
        out = self.pipe.run(names.GRAPH_LLM, **self.cache.feeds(embeds))
        self.cache.append(out)
        return out["logits"][0], out["hidden"]

    def _loc_embeds(self, boxes_norm: np.ndarray) -> np.ndarray:
        h = self.pipe.config["llm"]["hidden_size"]
        if not len(boxes_norm):
            return np.zeros((0, h), np.float32)
        return self.pipe.run(names.GRAPH_LOC_HEADS, hidden=np.zeros((1, h), np.float32),
                             boxes=np.asarray(boxes_norm, np.float32).reshape(-1, 4))["loc_embeds"]

    # -- a turn ----------------------------------------------------------------------------------------
    def _check_boxes(self, boxes) -> np.ndarray:
        """Region-input boxes -> [M,4] float32 pixels; refuses what cannot be a box on this image. A box that
        reaches past the image edge is kept (its normalised corners are clamped to the image, as the reference)."""
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
            if x2 <= 0 or y2 <= 0 or x1 >= self.width or y1 >= self.height:
                raise PromptError(f"box [{k}] {b[k].tolist()} lies outside the {self.width}x{self.height} image")
        return b.astype(np.float32)

    def _prompt(self, text: str, boxes) -> tuple[list[int], np.ndarray, str]:
        """(conversation ids, this turn's normalised region boxes in slot order, the turn's expanded user text)."""
        boxes_px = self._check_boxes(boxes)
        n_img = self.pipe.manifest.data["prompt"]["num_image_tokens"]
        prompt, order = build_prompt(text, num_image_tokens=n_img, num_boxes=len(boxes_px), history=self.history)
        region = pp.normalise_boxes(boxes_px[order], self.width, self.height) if order else np.zeros((0, 4), np.float32)
        ids = self.pipe.tokenizer.encode(prompt)
        cap = self.cache.capacity
        if len(ids) >= cap:
            raise PromptError(f"the prompt is {len(ids)} tokens (image and conversation included) but the build's "
                              f"context is {cap}; shorten it, start a new conversation, or re-export with a larger "
                              "--max-context")
        return ids, region, expand_region_refs(text, len(boxes_px))[0]

    def stream(self, text: str, *, boxes=None, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               iou_threshold: float | None = ..., timeline: Timeline | None = None) -> Iterator[Token | Box | Done]:
        """Yields Token per generated token, Box when a trigger's box is decoded, then Done with the result.
        iou_threshold: masks whose score is below it are dropped (default: the manifest's, 0.3); None keeps all.
        timeline: records the time of every stage (nxc-profile); time spent by the caller between events is not
        counted in any stage."""
        tl = self._tl = timeline or NO_TIMELINE
        m = self.pipe.manifest.data
        gen = m["generation"]
        max_new = gen["max_new_tokens"] if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new}")
        thr = gen["iou_threshold"] if iou_threshold is ... else iou_threshold
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        tok, d = self.pipe.tokens, m["dispatch"]
        trigger, slot, eos = tok[d["trigger"]], tok[d["slot"]], tok[names.EOS]
        table = self.pipe.embeddings

        # prefill: only what the cache does not hold (a follow-up turn re-uses the earlier ones)
        with tl.stage("preprocess"):
            ids, region, user_text = self._prompt(text, boxes)
            keep = 0
            while keep < min(len(self.cached_ids), len(ids) - 1) and self.cached_ids[keep] == ids[keep]:
                keep += 1
            self.cache.truncate(keep)
            emb = np.asarray(table[ids], np.float32)[None]
            start = ids.index(tok[names.IM_START]) if tok[names.IM_START] in ids else -1
            n_img = m["prompt"]["num_image_tokens"]
            slots = [i for i, x in enumerate(ids) if x == slot]
            slot_boxes = np.concatenate([np.asarray(self.history_boxes, np.float32).reshape(-1, 4), region])
            if len(slots) != len(slot_boxes):
                raise PromptError(f"the conversation has {len(slots)} <boxes> slots but {len(slot_boxes)} boxes; "
                                  "a literal '<boxes>' in the text is not allowed")
            todo = [i for i, s in enumerate(slots) if s >= keep]
        if start >= 0 and keep <= start + n_img:          # image rows still to feed: the vision graph runs once
            emb[0, start + 1:start + 1 + n_img] = self.features()
        if todo:
            with tl.stage("loc_heads"):
                emb[0, [slots[i] for i in todo]] = self._loc_embeds(slot_boxes[todo])
        with tl.stage("prefill"):
            logits, hidden = self._llm(emb[:, keep:])
        self.cached_ids = list(ids)

        rng = sampling.rng()
        out: list[int] = []
        dets: list[Detection] = []
        hiddens, seg_prompts = [], []
        text_so_far, last_slot_end = "", 0
        finish = "length"
        fed = ids[-1]
        #  decode loop (reference §5.2, dispatch from the manifest):
        #
        #   fed token == trigger? ──yes──▶ loc_heads(hidden) ─▶ box, seg_prompt, feedback
        #          │                        emit slot token; next input = feedback embed
        #          no
        #          ▼
        #   sample from logits ─▶ emit; next input = embeddings[token] ─▶ llm step ─▶ logits, hidden
        while True:
            t0 = time.perf_counter()
            if fed == trigger:
                with tl.stage("loc_heads"):
                    heads = self.pipe.run(names.GRAPH_LOC_HEADS, hidden=hidden, boxes=np.zeros((1, 4), np.float32))
                    box = heads["box"][0]
                    det = Detection(box=pp.boxes_to_pixels(box[None], self.width, self.height)[0], box_norm=box,
                                    phrase=_phrase(text_so_far[last_slot_end:]))
                dets.append(det)
                hiddens.append(hidden[0])
                seg_prompts.append(heads["seg_prompt"][0])
                nxt, x = slot, heads["feedback"][None]
                t0 = time.perf_counter()
            else:
                if len(out) >= max_new or self.cache.room() == 0:
                    break
                nxt = pick_token(np.asarray(logits, np.float32), sampling, rng)
                x = None
            out.append(nxt)
            new_text = self.pipe.tokenizer.decode(out)
            tl.add("decode", t0, time.perf_counter())
            tl.mark_first_token()
            yield Token(nxt, new_text[len(text_so_far):])
            text_so_far = new_text
            if nxt == slot:
                last_slot_end = len(text_so_far)
                yield Box(len(dets) - 1, dets[-1])
            if nxt == eos:
                finish = "stop"
                break
            if (len(out) >= max_new and nxt != trigger) or self.cache.room() == 0:
                break
            with tl.stage("decode"):
                if x is None:
                    x = np.asarray(table[[nxt]], np.float32)[None]
                logits, hidden = self._llm(x)
            self.cached_ids.append(nxt)
            fed = nxt

        if dets:
            s = m["preprocess"]["sam"]["size"]
            image_embedding = self.sam_embedding()
            with tl.stage("sam_decoder"):
                boxes_norm = np.stack([dd.box_norm for dd in dets]).astype(np.float32)
                dec = self.pipe.run(names.GRAPH_SAM_DECODER, image_embedding=image_embedding,
                                    boxes=boxes_norm * s, seg_prompt=np.stack(seg_prompts).astype(np.float32))
            with tl.stage("postprocess"):
                masks = pp.masks_to_image(dec["low_res_masks"], dec["iou"], s, self.width, self.height, thr)
                for k, dd in enumerate(dets):
                    dd.mask, dd.score = masks[k], float(dec["iou"][k, 0])
        with tl.stage("postprocess"):
            raw = self.pipe.tokenizer.decode(out)
            self.history.append(Turn(user_text, raw))
            self.history_boxes += list(region) + [dd.box_norm for dd in dets]
            result = ChatResult(text=render_reply(raw), raw_text=raw, token_ids=out, prompt_ids=ids,
                                finish_reason=finish, detections=dets)
        tl.finish()
        self._tl = NO_TIMELINE
        yield Done(result)

    def add_turn(self, user_text: str, reply_raw: str, *, boxes=None, reply_boxes=()) -> None:
        """Record an earlier turn without running the model (a stateless server rebuilding a conversation from the
        messages it is sent). `reply_raw` is the reply as decoded (`<at> <boxes>` literal); `reply_boxes` holds the
        normalised box of each of its slots, in order. The next `ask` prefills the whole conversation."""
        boxes_px = self._check_boxes(boxes)
        expanded, order = expand_region_refs(user_text, len(boxes_px))
        check_all_boxes_used(order, len(boxes_px))
        reply_boxes = np.asarray(reply_boxes, np.float32).reshape(-1, 4)
        if reply_raw.count(SLOT) != len(reply_boxes):
            raise PromptError(f"an earlier reply has {reply_raw.count(SLOT)} grounded phrase(s) but "
                              f"{len(reply_boxes)} box(es) came with it; send earlier replies back with their boxes")
        region = pp.normalise_boxes(boxes_px[order], self.width, self.height) if order else np.zeros((0, 4), np.float32)
        self.history.append(Turn(expanded, reply_raw))
        self.history_boxes += list(region) + list(reply_boxes)

    def ask(self, text: str, **kwargs) -> ChatResult:
        result = None
        for ev in self.stream(text, **kwargs):
            if isinstance(ev, Done):
                result = ev.result
        return result
