"""The torch-free NExT-Chat pipeline: a build directory in, text + boxes + masks out.

    pipe = Pipeline.load("build/fp32")                      # backend="onnxruntime" | "tensorrt"
    r = pipe.chat(image, "Where is the red circle?")        # r.text "Answer: [0] .", r.detections[0].box / .mask
    conv = pipe.conversation(image)                          # keeps the image features and the KV cache
    conv.ask("Where is the red circle?"); conv.ask("And the blue square?")   # no re-encoding, no re-prefill
    for ev in pipe.stream(image, "Describe the image with locations."): ...  # Token / Box events, then Done

A turn is prefill (what the cache does not hold yet) -> the decode loop (nxc.decode, heads from the manifest via
nxc.runtime.dispatch) -> finish (each head's once-per-reply stage, e.g. SAM masks).

Threading: a Pipeline (its sessions) may be shared by threads; a Conversation belongs to one thread at a time.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from nxc import names
from nxc.decode import assemble_prefill, beam_search, decode_loop
from nxc.manifest import BuildError, Manifest, load_manifest
from nxc.prompt import (REGRESSION, SLOT, PromptError, PromptFormat, Turn, check_all_boxes_used, expand_region_refs,
                        prompt_segments, render_reply)
from nxc.runtime import preprocess as pp
from nxc.runtime.dispatch import Box, Detection, Dispatch
from nxc.runtime.kv_cache import BatchCache, KVCache
from nxc.runtime.timing import NO_TIMELINE, Timeline
from nxc.runtime.tokenizer import Tokenizer
from nxc.sampling import SamplingParams, pick_token

__all__ = ["Box", "ChatResult", "Conversation", "Detection", "Done", "Pipeline", "Token"]

PREFILL_CHUNK = 256     # prompt rows per llm call (Pipeline.llm_step); 1.1B int4, 600 rows: 7.7 s -> 7.2 s, +0.25 -> +0.1 GB


@dataclass
class ChatResult:
    text: str                  # reply with each `<at> <boxes>` rendered as [k]
    raw_text: str              # reply as decoded, with the literal tokens
    token_ids: list[int]       # generated ids (`<boxes>` after every `<at>`)
    prompt_ids: list[int]      # the whole conversation's ids for this turn
    finish_reason: str         # "stop" (</s>) or "length" (max_new_tokens or the build's context)
    detections: list = field(default_factory=list)     # what the heads found, in order (Detection for boxes)


@dataclass
class Token:
    id: int
    text: str                  # decoded text this token adds


@dataclass
class Done:
    result: ChatResult


class Pipeline:
    """A loaded build. Graph runners are created on first use (SAM only when a trigger fires)."""

    def __init__(self, *, manifest: Manifest, tokenizer: Tokenizer, backend, low_memory: bool = False):
        self.manifest, self.tokenizer, self.backend = manifest, tokenizer, backend
        # low_memory: the graphs run once per image (vision, sam_encoder) are unloaded after each use and loaded
        # again when the next image needs them: their sessions (7B-336 int4: 0.51 + 0.79 GB) are not held next
        # to the llm's, at the cost of a session load per image; and a conversation gives back its KV cache before
        # a reply's once-per-reply stages (SAM; 7B: 0.5 MB per position) so they never run beside it, at the cost
        # of prefilling the conversation again at its next turn
        self.low_memory = low_memory
        self.config = manifest.config
        self.tokens = manifest.tokens
        self.embeddings = np.load(manifest.path(manifest.embeddings.file), mmap_mode="r")
        self.kv_dtype = np.dtype(manifest.kv_cache.dtype)
        self._runners: dict = {}
        self._lock = threading.Lock()
        self.dispatch = Dispatch(self)

    @classmethod
    def load(cls, build_dir: str | Path, backend: str = "onnxruntime", providers: list[str] | None = None,
             *, threads: int | None = None, verify: bool = True, low_memory: bool = False) -> "Pipeline":
        from nxc.runtime.backends import get_backend
        manifest = load_manifest(build_dir, verify=verify)
        tokenizer = Tokenizer.from_file(manifest.path(manifest.tokenizer_file))
        return cls(manifest=manifest, tokenizer=tokenizer,
                   backend=get_backend(backend, providers=providers, threads=threads), low_memory=low_memory)

    def runner(self, graph: str):
        with self._lock:
            if graph not in self._runners:
                self._runners[graph] = self.backend.load(self.manifest.graph_path(graph), self.manifest.graph_spec(graph))
            return self._runners[graph]

    def run(self, graph: str, **feeds) -> dict[str, np.ndarray]:
        return self.runner(graph).run(feeds)

    def run_once_per_image(self, graph: str, **feeds) -> dict[str, np.ndarray]:
        """run() for vision / sam_encoder; in low_memory mode the graph's session is unloaded afterwards."""
        try:
            return self.run(graph, **feeds)
        finally:
            if self.low_memory:
                with self._lock:
                    self._runners.pop(graph, None)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """A KV cache in the backend's memory (host for CPU, device for CUDA / TensorRT)."""
        llm = self.config.llm
        return KVCache(num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads,
                       head_dim=llm.hidden_size // llm.num_heads, capacity=capacity or self.manifest.max_context,
                       dtype=self.kv_dtype, memory=self.backend.kv_memory)

    def batch_rows(self, slots: int, *, what: str, instead: str):
        """(the llm runner, a BatchCache of `slots` rows) for decoding rows together: ONNX Runtime with the KV cache
        in host memory; elsewhere a BackendError naming `what` needs it and what to do `instead`."""
        runner = self.runner(names.GRAPH_LLM)
        device = self.backend.kv_memory.device
        if not hasattr(runner, "run_rows") or device != "cpu":
            from nxc.runtime.backends import BackendError
            raise BackendError(f"{what} runs on the onnxruntime backend with the KV cache in host memory; this "
                               f"pipeline uses {self.backend.name} with its cache on {device}: {instead}")
        llm = self.config.llm
        return runner, BatchCache(num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads,
                                  head_dim=llm.hidden_size // llm.num_heads, slots=slots,
                                  capacity=self.manifest.max_context, dtype=self.kv_dtype)

    def llm_step(self, embeds: np.ndarray, cache: KVCache) -> tuple[np.ndarray, np.ndarray]:
        """Feed [1,T,H] embeddings after the cache (written in place); -> last logits [V], hidden [1,H].
        A prompt longer than PREFILL_CHUNK rows goes in in chunks, each after the cache the previous one wrote:
        the llm's activations, which ONNX Runtime's arena keeps after the call, then scale with the chunk rather
        than the prompt (7B, 614 rows: docs/DESIGN.md "True size"), at no cost in time."""
        runner = self.runner(names.GRAPH_LLM)
        for start in range(0, max(1, embeds.shape[1]), PREFILL_CHUNK):
            out = runner.run_cached(np.ascontiguousarray(embeds[:, start:start + PREFILL_CHUNK]), cache)
        return out["logits"][0], out["hidden"]

    # -- the public calls ------------------------------------------------------------------------------
    def conversation(self, image: Image.Image) -> "Conversation":
        return Conversation(self, image)

    def chat(self, image: Image.Image, text: str, boxes=None, **kwargs) -> ChatResult:
        return self.conversation(image).ask(text, boxes=boxes, **kwargs)

    def stream(self, image: Image.Image, text: str, boxes=None, **kwargs) -> Iterator[Token | Box | Done]:
        return self.conversation(image).stream(text, boxes=boxes, **kwargs)


@dataclass
class _Reply:
    """One reply being decoded."""
    tokens: list[int] = field(default_factory=list)
    text: str = ""                              # decoded so far, literal tokens kept
    slot_end: int = 0                           # len(text) after the last emitted slot
    found: list = field(default_factory=list)   # (bound head, record) per trigger, in order
    watches: dict = field(default_factory=dict)  # bound head -> its watcher, for heads that read the tokens


def _check_beams(num_beams, length_penalty, early_stopping, sampling: SamplingParams) -> None:
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


class _Shared:
    """A value computed once for several conversations on one image (their SAM image embedding)."""

    def __init__(self):
        self.lock, self.value = threading.Lock(), None


@dataclass
class _Turn:
    """A turn's checked arguments and prompt."""
    ids: list[int]
    region: np.ndarray
    user_text: str
    max_new: int
    sampling: SamplingParams
    threshold: float | None


def _one_turn(method):
    """Run a Conversation method (a generator: until it ends or is closed) holding the conversation's claim, so that
    a second turn started meanwhile is refused at once (Conversation._claim) instead of interleaving on its cache."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def claimed(self, *args, **kwargs):
            self._claim()
            try:
                yield from method(self, *args, **kwargs)
            finally:
                self._release()
    else:
        @functools.wraps(method)
        def claimed(self, *args, **kwargs):
            self._claim()
            try:
                return method(self, *args, **kwargs)
            finally:
                self._release()
    return claimed


class Conversation:
    """One image, several turns. Keeps the image features, the SAM image embedding (once a trigger fired) and the
    KV cache of everything said so far; a turn feeds only what the cache does not hold yet."""

    def __init__(self, pipe: Pipeline, image: Image.Image):
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image, got {type(image).__name__}; load it with nxc.runtime.images")
        self.pipe = pipe
        self.image = image.convert("RGB")
        self.width, self.height = self.image.size
        self.cache = pipe.new_cache()
        self.cached_ids: list[int] = []
        self.history: list[Turn] = []
        self.history_slots: list[np.ndarray] = []     # the value of every emitted slot so far, in order
        self._features: np.ndarray | None = None
        self._sam_embedding: np.ndarray | None = None
        self._sam_share: _Shared | None = None      # n completions of one turn share one SAM image encoding
        self._objects: tuple | None = None          # retrieval: (boxes, scores, feature map) of the proposals graph
        self._turn_values: list | None = None       # the slot values of the turn being prefilled / answered
        self.timeline = NO_TIMELINE
        self._busy, self._owner = threading.Lock(), None      # one turn at a time: stream / add_turn claim it

    def _claim(self) -> None:
        """Start a turn or refuse at once: two turns interleaved on one KV cache and history corrupt both."""
        if not self._busy.acquire(blocking=False):
            if self._owner == threading.get_ident():
                raise RuntimeError("this Conversation is still answering: finish the stream it gave (or close() it) "
                                   "before the next turn")
            raise RuntimeError("this Conversation is answering in another thread; give each thread its own "
                               "(pipe.conversation(image))")
        self._owner = threading.get_ident()

    def _release(self) -> None:
        self._owner = None
        self._busy.release()

    # -- graph calls -----------------------------------------------------------------------------------
    def features(self) -> np.ndarray:
        if self._features is None:
            clip = self.pipe.manifest.clip
            with self.timeline.stage("preprocess"):
                px = pp.clip_pixels(self.image, clip.size, mean=clip.mean, std=clip.std, resample=clip.resample)
            with self.timeline.stage("vision"):
                self._features = self.pipe.run_once_per_image(names.GRAPH_VISION, pixel_values=px)["image_embeds"][0]
        return self._features

    def sam_embedding(self) -> np.ndarray:
        if self._sam_embedding is None:
            share = self._sam_share
            with share.lock if share is not None else contextlib.nullcontext():
                if share is not None and share.value is not None:
                    self._sam_embedding = share.value
                    return self._sam_embedding
                sam = self.pipe.manifest.sam
                with self.timeline.stage("preprocess"):
                    px = pp.sam_pixels(self.image, sam.size, mean=sam.mean, std=sam.std, resample=sam.resample)
                with self.timeline.stage("sam_encoder"):
                    self._sam_embedding = self.pipe.run_once_per_image(names.GRAPH_SAM_ENCODER,
                                                                       image=px)["image_embedding"]
                if share is not None:
                    share.value = self._sam_embedding
        return self._sam_embedding

    def objects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Retrieval builds: (proposal boxes [P,4] normalised square frame, their scores [P], the object encoder's
        feature map) from the proposals graph, once per image; the score threshold and NMS after the graph
        (nxc.proposal_filter, the build's config)."""
        if self._objects is None:
            from nxc.proposal_filter import filter_proposals
            o, pre = self.pipe.config.objects, self.pipe.manifest.objects
            with self.timeline.stage("preprocess"):
                px = pp.clip_pixels(self.image, pre.size, mean=pre.mean, std=pre.std, resample=pre.resample)
            with self.timeline.stage(names.GRAPH_PROPOSALS):
                out = self.pipe.run_once_per_image(names.GRAPH_PROPOSALS, pixels=px)
            boxes, scores = filter_proposals(out["boxes"][0], out["scores"][0], score_threshold=o.score_threshold,
                                             iou_threshold=o.nms_iou, max_out=o.max_proposals)
            self._objects = (boxes, scores, out["features"])
        return self._objects

    def proposals(self) -> tuple[np.ndarray, np.ndarray]:
        """Retrieval builds: the image's proposals as pixel boxes [P,4] (xyxy on the original image) and their
        scores [P]; proposal k is `<objk>` in the prompt (a reply naming it gives this box)."""
        boxes, scores, _ = self.objects()
        return pp.boxes_to_pixels(boxes, self.width, self.height), scores

    def object_values(self) -> list[np.ndarray]:
        """Retrieval builds: the boxes of the object list the turn being answered sees (proposals, then every
        region box so far, this turn's included): what an index in its reply names."""
        return self._turn_values if self._turn_values is not None else self.history_slots

    def image_output(self, source: str) -> np.ndarray:
        """A head input fed from a once-per-image graph output ("proposals:features")."""
        if source == f"{names.GRAPH_PROPOSALS}:features":
            return self.objects()[2]
        raise BuildError(f"{self.pipe.manifest.root}: a head input comes from {source!r}, which this runtime does not "
                         "know; use the nxc that wrote the build")

    def _format(self) -> PromptFormat:
        """The prompt's grounding format; a retrieval build's first turn lists its proposals (the conversation's
        first slot values)."""
        if self.pipe.dispatch.index_head is None:
            return REGRESSION
        boxes = self.objects()[0]
        if not self.history and not self.history_slots:
            self.history_slots = list(boxes)
        return PromptFormat(objects=len(boxes))

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

    def _region(self, boxes_px: np.ndarray, order: list[int]) -> np.ndarray:
        """Region-input boxes in the order their slots appear, normalised to the padded square: [K,4]."""
        return pp.normalise_boxes(boxes_px[order], self.width, self.height) if order else np.zeros((0, 4), np.float32)

    def _prompt(self, text: str, boxes, special_tokens_in_text: bool = False) -> tuple[list[int], np.ndarray, str]:
        """(conversation ids, this turn's normalised region boxes in slot order, the turn's user text as typed).
        Special-token strings in user texts and replies are plain text unless special_tokens_in_text (nxc.prompt)."""
        if not isinstance(text, str):
            raise PromptError(f"the prompt must be text (str), got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise PromptError(f"the prompt is not valid Unicode text ({e.reason} at character {e.start}); pass the "
                              "question as UTF-8 text") from None
        boxes_px = self._check_boxes(boxes)
        segments, order = prompt_segments(text, num_image_tokens=self.pipe.manifest.prompt.num_image_tokens,
                                          num_boxes=len(boxes_px), history=self.history,
                                          special_tokens_in_text=special_tokens_in_text, fmt=self._format())
        region = self._region(boxes_px, order)
        ids = self.pipe.tokenizer.encode_segments(segments)
        cap = self.cache.capacity
        if len(ids) >= cap:
            raise PromptError(f"the prompt is {len(ids)} tokens (image and conversation included) but the build's "
                              f"context is {cap}; shorten it, start a new conversation, or re-export with a larger "
                              "--max-context")
        return ids, region, text

    def _prefill_rows(self, ids: list[int], region: np.ndarray) -> np.ndarray:
        """[T,H]: the rows of what the cache does not hold yet (a follow-up turn re-uses the earlier ones): image
        rows from the vision graph (once), slot rows from the slot head's encode graph. Truncates the cache to
        what it keeps."""
        tok, m, head = self.pipe.tokens, self.pipe.manifest, self.pipe.dispatch.slot_head
        with self.timeline.stage("preprocess"):
            keep = 0
            while keep < min(len(self.cached_ids), len(ids) - 1) and self.cached_ids[keep] == ids[keep]:
                keep += 1
            self.cache.truncate(keep)
            values = np.asarray(self.history_slots + list(region), np.float32)
            self._turn_values = list(values)

        def slot_rows(ks: list[int]) -> np.ndarray:
            with self.timeline.stage(head.head.graph):
                return head.encode(values[ks], self, ks)
        return assemble_prefill(ids, np.asarray(self.pipe.embeddings[ids], np.float32), first=keep,
                                image_span=(tok[names.IM_START], tok[names.IM_END], m.prompt.num_image_tokens),
                                image_features=self.features, slot=head.emit if head else -1,
                                num_slot_values=len(values), slot_rows=slot_rows)

    def _prefill(self, ids: list[int], region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed what the cache does not hold yet. -> last logits, hidden."""
        emb = self._prefill_rows(ids, region)
        with self.timeline.stage("prefill"):
            logits, hidden = self.pipe.llm_step(emb[None], self.cache)
        self.cached_ids = list(ids)
        return logits, hidden

    def _step(self, token: int, x: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        with self.timeline.stage("decode"):
            if x is None:
                x = np.asarray(self.pipe.embeddings[[token]], np.float32)[None]
            out = self.pipe.llm_step(x, self.cache)
        self.cached_ids.append(token)
        return out

    def _decode(self, logits, hidden, fed: int, max_new: int, sampling: SamplingParams,
                reply: _Reply) -> Iterator[Token | object]:
        """The decode loop (reference §5.2; dispatch from the manifest's heads):

          fed token is a head's trigger? ──yes──▶ head graph(hidden) ─▶ record (e.g. box), emit its slot token,
                 │ no                              next input = its feedback embedding
                 ▼
          pick from logits ─▶ emit; next input = embeddings[token] ─▶ llm step (in-place cache) ─▶ logits, hidden
        """
        tl, choose_token = self.timeline, self._picker(sampling)
        picked = []                     # when the last sampled token's choice began: its host-side decode event

        def pick(lg, n):
            picked.append(time.perf_counter())
            return choose_token(lg, n)

        def timed(head):
            def fire(h):
                with tl.stage(head.head.graph):
                    return head(h)
            return fire
        heads = {t: timed(b) for t, b in self.pipe.dispatch.triggers.items()}
        for token, found in decode_loop(logits=logits, hidden=hidden, fed=fed, step=self._step, pick=pick,
                                        heads=heads, max_new=max_new, eos=self.pipe.tokens[names.EOS],
                                        room=self.cache.room):
            t0 = picked.pop() if picked else time.perf_counter()
            events = self._on_token(reply, token, found)
            tl.add("decode", t0, time.perf_counter())
            tl.mark_first_token()
            yield from events

    def _beams(self, logits, hidden, turn: "_Turn", reply: _Reply, num_beams: int, length_penalty: float,
               early_stopping) -> Iterator[Token | object]:
        """Beam search over a BatchCache of num_beams rows that starts as copies of this conversation's cache; the
        conversation's own cache keeps the prompt (a next turn feeds the reply again, as any turn it did not
        decode itself).

            prompt rows (this cache) ─copy─▶ row 0 ─▶ per step: rows reordered to their beams (one copy of the
            rows that change), one llm call for all beams, heads for the beams fed a trigger (nxc.decode)"""
        pipe = self.pipe
        runner, batch = pipe.batch_rows(num_beams, what="beam search", instead="use num_beams=1")
        p = self.cache.length
        batch.reserve(p + 1)
        for name, rows in self.cache.arrays().items():
            batch.buffers[name][0, :p] = rows[0]
        batch.lengths[:] = p
        identity = list(range(num_beams))

        def step(order, tokens, xs):
            with self.timeline.stage("decode"):
                if order != identity:
                    n = int(batch.lengths[0])
                    moved = [i for i in identity if order[i] != i]
                    for buf in batch.buffers.values():
                        buf[moved, :n] = buf[[order[i] for i in moved], :n]
                emb = np.concatenate([np.asarray(pipe.embeddings[[t]], np.float32)[None] if x is None
                                      else np.asarray(x, np.float32).reshape(1, 1, -1) for t, x in zip(tokens, xs)])
                out = runner.run_rows(emb, batch, num_beams)
            return out["logits"], [out["hidden"][i:i + 1] for i in identity]

        hyp = beam_search(logits=logits, hidden=hidden, fed=turn.ids[-1], step=step, heads=pipe.dispatch.triggers,
                          num_beams=num_beams, max_new=turn.max_new, eos=pipe.tokens[names.EOS],
                          length_penalty=length_penalty, early_stopping=early_stopping,
                          banned=pipe.dispatch.never_sampled, room=lambda: batch.capacity - int(batch.lengths[0]))
        found, prev = list(hyp.found), turn.ids[-1]
        for token in hyp.tokens:
            f = found.pop(0) if prev in pipe.dispatch.triggers else None
            yield from self._on_token(reply, token, f)
            prev = token

    def _picker(self, sampling: SamplingParams):
        """pick(logits, n) for the decode loop: the turn's sampling, its own generator, the ids never sampled."""
        rng, banned = sampling.rng(), self.pipe.dispatch.never_sampled
        return lambda lg, n: pick_token(np.asarray(lg, np.float32), sampling, rng, banned=banned)

    def _on_token(self, reply: _Reply, token: int, found) -> list:
        """A generated token joins the reply: its Token event, and the head's event when it closes a trigger
        (batch 1 and nxc.runtime.batch alike)."""
        events = []
        if found is not None:
            record = found.head.kind.record(self, found.outputs, reply.text[reply.slot_end:])
            reply.found.append((found.head, record))
        reply.tokens.append(token)
        text = self.pipe.tokenizer.decode(reply.tokens)
        events.append(Token(token, text[len(reply.text):]))
        reply.text = text
        if found is not None:
            reply.slot_end = len(text)
            event = found.head.kind.event(len(reply.found) - 1, record)
            if event is not None:
                events.append(event)
        for bound in self.pipe.dispatch.watchers:           # heads that read the tokens (retrieval's indices)
            if bound not in reply.watches:
                reply.watches[bound] = bound.kind.watch(self, reply)
            for record in reply.watches[bound].feed(token):
                reply.found.append((bound, record))
                events.append(bound.kind.event(len(reply.found) - 1, record))
        return events

    def forget_cache(self) -> None:
        """Give back the KV cache's memory; the next turn prefills the whole conversation again."""
        self.cache = None
        self.cache, self.cached_ids = self.pipe.new_cache(), []

    def _finish(self, reply: _Reply, ids: list[int], region: np.ndarray, user_text: str, threshold) -> ChatResult:
        """Each head's once-per-reply stage (SAM masks for boxes), then the turn joins the history."""
        for bound in self.pipe.dispatch.heads:
            bound.kind.finish(self, [r for b, r in reply.found if b is bound], threshold)
        with self.timeline.stage("postprocess"):
            raw = self.pipe.tokenizer.decode(reply.tokens)
            self.history.append(Turn(user_text, raw))
            fed_back = [b.kind.slot_value(r) for b, r in reply.found]
            self.history_slots += list(region) + [v for v in fed_back if v is not None]
            self._turn_values = None
            eos = self.pipe.tokens[names.EOS]
            text = render_reply(raw)
            for bound, watch in reply.watches.items():
                text = bound.kind.render(text, watch)
            return ChatResult(text=text, raw_text=raw, token_ids=reply.tokens, prompt_ids=ids,
                              finish_reason="stop" if reply.tokens and reply.tokens[-1] == eos else "length",
                              detections=[r for _, r in reply.found])

    @_one_turn
    def stream(self, text: str, *, boxes=None, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               iou_threshold: float | None = ..., timeline: Timeline | None = None,
               special_tokens_in_text: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
               early_stopping: bool | str = False) -> Iterator[Token | Box | Done]:
        """Yields Token per generated token, Box when a trigger's box is decoded, then Done with the result.
        iou_threshold: masks whose score is below it are dropped (default: the manifest's, 0.3); None keeps all.
        special_tokens_in_text: `<at>`, `</s>`, `<im_start>`... typed in the text (and in earlier turns) become
        tokens, as in the original model; by default they are plain text (nxc.prompt).
        timeline: records the time of every stage (nxc-profile); time spent by the caller between events is not
        counted in any stage.
        num_beams > 1: beam search (Hugging Face's length_penalty / early_stopping semantics, greedy, triggers per
        beam; nxc.decode.beam_search); the events come when the search ends, from the winning beam."""
        self.timeline = timeline or NO_TIMELINE
        turn = self._begin(text, boxes=boxes, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, iou_threshold=iou_threshold,
                           special_tokens_in_text=special_tokens_in_text)
        _check_beams(num_beams, length_penalty, early_stopping, turn.sampling)
        logits, hidden = self._prefill(turn.ids, turn.region)
        reply = _Reply()
        if num_beams > 1:
            yield from self._beams(logits, hidden, turn, reply, num_beams, length_penalty, early_stopping)
        else:
            yield from self._decode(logits, hidden, turn.ids[-1], turn.max_new, turn.sampling, reply)
        if self.pipe.low_memory and any(b.head.finish for b, _ in reply.found):
            self.forget_cache()        # the heads' stages (SAM) run without the KV cache beside them
        result = self._finish(reply, turn.ids, turn.region, turn.user_text, turn.threshold)
        self.timeline.finish()
        self.timeline = NO_TIMELINE
        yield Done(result)

    def _begin(self, text: str, *, boxes, max_new_tokens, temperature, top_p, top_k, seed, iou_threshold,
               special_tokens_in_text) -> "_Turn":
        """A turn's checked arguments and prompt (stream's, and nxc.runtime.batch's)."""
        gen = self.pipe.manifest.generation
        max_new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        if isinstance(max_new, bool) or not isinstance(max_new, (int, np.integer)) or max_new < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1 (None: the build's {gen.max_new_tokens}), "
                             f"got {max_new_tokens!r}")
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        if self.pipe.dispatch.index_head is not None:
            self.objects()                  # the proposals graph, timed as its own stage (not inside preprocess)
        with self.timeline.stage("preprocess"):
            ids, region, user_text = self._prompt(text, boxes, special_tokens_in_text)
        return _Turn(ids, region, user_text, int(max_new), sampling,
                     gen.iou_threshold if iou_threshold is ... else iou_threshold)

    @_one_turn
    def add_turn(self, user_text: str, reply_raw: str, *, boxes=None, reply_boxes=()) -> None:
        """Record an earlier turn without running the model (a stateless server rebuilding a conversation from the
        messages it is sent). `reply_raw` is the reply as decoded (`<at> <boxes>` literal); `reply_boxes` holds the
        normalised box of each of its slots, in order. The next `ask` prefills the whole conversation."""
        boxes_px = self._check_boxes(boxes)
        self._format()                                  # a retrieval build's object list comes first
        _, order = expand_region_refs(user_text, len(boxes_px))
        check_all_boxes_used(order, len(boxes_px))
        reply_boxes = np.asarray(reply_boxes, np.float32).reshape(-1, 4)
        if reply_raw.count(SLOT) != len(reply_boxes):
            raise PromptError(f"an earlier reply has {reply_raw.count(SLOT)} grounded phrase(s) but "
                              f"{len(reply_boxes)} box(es) came with it; send earlier replies back with their boxes")
        region = self._region(boxes_px, order)
        self.history.append(Turn(user_text, reply_raw))
        self.history_slots += list(region) + list(reply_boxes)

    def ask(self, text: str, **kwargs) -> ChatResult:
        result = None
        for ev in self.stream(text, **kwargs):
            if isinstance(ev, Done):
                result = ev.result
        return result
