"""A conversation: one image, several turns, on a loaded Pipeline. Knows the decode loop and the prompt, and nothing
of a family: what a build's heads need per image (SAM embedding, proposals), how they format the prompt and what
they do once per reply come from their kinds (nxc.runtime.heads), through conv.state(kind) and the kinds' hooks.

    a turn: check (nxc.runtime.turn) ─▶ heads' prepare ─▶ prompt ids ─▶ prefill (what the cache lacks: image rows
    from the vision graph once, slot rows from the slot head's encode graph) ─▶ decode loop or beams ─▶ heads'
    finish (SAM masks) ─▶ history

Threading: a Conversation belongs to one thread at a time (a second turn started meanwhile is refused at once).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping

import numpy as np
from PIL import Image

from nxc import names
from nxc.decode import assemble_prefill, decode_loop
from nxc.manifest import BuildError
from nxc.prompt import (REGRESSION, SLOT, PromptError, PromptFormat, Turn as HistoryTurn, check_all_boxes_used,
                        expand_region_refs, prompt_segments, render_reply)
from nxc.runtime import preprocess as pp
from nxc.runtime.beams import beam_reply
from nxc.runtime.events import Box, ChatResult, Done, Token
from nxc.runtime.events import Image as Picture
from nxc.runtime.modules import CallResult
from nxc.runtime.timing import NO_TIMELINE, Timeline
from nxc.runtime.turn import (Claim, Reply, Turn, check_beams, check_boxes, check_max_new, check_text, one_turn,
                              region_boxes)
from nxc.runtime.video import Video, mean_rows
from nxc.sampling import SamplingParams, pick_token


class _States:
    """The heads' per-image states of a conversation (conv.state), made once under a lock."""

    def __init__(self):
        self.lock, self.by_kind = threading.Lock(), {}


class Conversation:
    """One image, several turns. Keeps the image features, the heads' per-image states (once a turn needed them)
    and the KV cache of everything said so far; a turn feeds only what the cache does not hold yet."""

    def __init__(self, pipe, image):
        self.video = image if isinstance(image, Video) else None     # a video: its frames averaged (features)
        if self.video is not None:
            image = self.video.frames[0]
        if not isinstance(image, Image.Image):
            raise TypeError(f"image must be a PIL.Image or an nxc.runtime.video.Video, got {type(image).__name__}; "
                            "load it with nxc.runtime.images / nxc.runtime.video")
        self.pipe = pipe
        self.image = image.convert("RGB")
        self.width, self.height = self.image.size
        self.cache = pipe.new_cache()
        self.cached_ids: list[int] = []
        self.history: list[HistoryTurn] = []
        self.history_slots: list[np.ndarray] = []     # the value of every emitted slot so far, in order
        self.history_regions: set[int] = set()        # the places in history_slots of the user's regions
        self._features: np.ndarray | None = None
        self._patches: np.ndarray | None = None       # the vision graph's patch features (a region extractor's build)
        self._states = _States()
        self._turn_values: list | None = None       # the slot values of the turn being prefilled / answered
        self.timeline = NO_TIMELINE
        self._claim = Claim()                        # one turn at a time: stream / add_turn take it
        self.turn_boxes = np.zeros((0, 4), np.float32)

    def twin(self) -> "Conversation":
        """Another Conversation on the same image and history (n completions of one turn), sharing the image
        features and what the heads computed for the image."""
        twin = Conversation(self.pipe, self.video or self.image)
        twin.history, twin.history_slots = list(self.history), list(self.history_slots)
        twin.history_regions = set(self.history_regions)
        twin._features, twin._patches, twin._turn_values = self._features, self._patches, self._turn_values
        for bound in self.pipe.dispatch.heads:       # made now (nothing runs) so that the twins share them
            self.state(bound.head.kind)
        with self._states.lock:
            twin._states.by_kind = {k: s.twin(twin) for k, s in self._states.by_kind.items() if s is not None}
        return twin

    # -- the image -------------------------------------------------------------------------------------
    def features(self) -> np.ndarray:
        """[N,H] image rows from the vision graph, once per conversation; a video's: each frame's rows, averaged over
        the frames (VITRON's video input)."""
        if self._features is None:
            clip = self.pipe.manifest.clip
            rows, patches = [], []
            for frame in (self.video.frames if self.video is not None else [self.image]):
                with self.timeline.stage("preprocess"):
                    px = pp.clip_pixels(frame, clip.size, mean=clip.mean, std=clip.std, resample=clip.resample)
                with self.timeline.stage("vision"):
                    out = self.pipe.run_once_per_image(names.GRAPH_VISION, pixel_values=px)
                rows.append(out["image_embeds"][0])
                if "patch_features" in out:
                    patches.append(out["patch_features"][0])
            self._features = rows[0] if len(rows) == 1 else mean_rows(rows)
            self._patches = None if not patches else patches[0] if len(patches) == 1 else mean_rows(patches)
        return self._features

    def patch_features(self) -> np.ndarray:
        """[N,Dv] the vision tower's patch features before the projector (a region extractor's build; a video's
        averaged over its frames, as its rows are)."""
        self.features()
        if self._patches is None:
            raise BuildError(f"{self.pipe.manifest.root}: the vision graph has no patch_features output, which this "
                             "build's heads read; re-export it with the nxc that wrote the manifest")
        return self._patches

    def slot_is_region(self, k: int) -> bool:
        """Whether slot value k of the turn being prefilled is a user's region (not the model's own box)."""
        return k >= len(self.history_slots) or k in self.history_regions

    def state(self, kind: str):
        """What the build's `kind` head keeps for this image, made on first use: "box" -> its SAM embedding
        (`.embedding()`), "index" -> the proposals (`.objects()`, `.proposals()`)."""
        with self._states.lock:
            if kind not in self._states.by_kind:
                bound = self.pipe.dispatch.head_of_kind(kind)
                if bound is None:
                    raise BuildError(f"{self.pipe.manifest.root}: this build has no {kind!r} head (its heads: "
                                     f"{', '.join(b.head.kind for b in self.pipe.dispatch.heads) or 'none'})")
                self._states.by_kind[kind] = bound.kind.new_state(self)
            return self._states.by_kind[kind]

    def slot_values(self) -> list[np.ndarray]:
        """The slot values the turn being answered sees (every earlier slot, then this turn's region boxes); a
        retrieval build's object list (its proposals first): what an index in its reply names."""
        return self._turn_values if self._turn_values is not None else self.history_slots

    # -- a turn ----------------------------------------------------------------------------------------
    def _format(self) -> PromptFormat:
        """The prompt's grounding format: the heads' (a retrieval build's first turn lists its proposals)."""
        fmt = REGRESSION
        for bound in self.pipe.dispatch.heads:
            fmt = bound.kind.prompt_format(self) or fmt
        return fmt

    def _prompt(self, text: str, boxes, special_tokens_in_text: bool = False) -> tuple[list[int], np.ndarray, str]:
        """(conversation ids, this turn's normalised region boxes in slot order, the turn's user text as typed).
        Special-token strings in user texts and replies are plain text unless special_tokens_in_text (nxc.prompt)."""
        check_text(text)
        boxes_px = check_boxes(boxes, self.width, self.height)
        segments, order = prompt_segments(text, num_image_tokens=self.pipe.manifest.prompt.num_image_tokens,
                                          num_boxes=len(boxes_px), history=self.history,
                                          special_tokens_in_text=special_tokens_in_text, fmt=self._format())
        region = region_boxes(boxes_px, order, self.width, self.height)
        self.turn_boxes = boxes_px                   # the turn's region inputs [k], pixels (a module call's [k])
        ids = self.pipe.tokenizer.encode_segments(segments)
        cap = self.cache.capacity
        if len(ids) >= cap:
            raise PromptError(f"the prompt is {len(ids)} tokens (image and conversation included) but the build's "
                              f"context is {cap}; shorten it, start a new conversation, or re-export with a larger "
                              "--max-context")
        return ids, region, text

    def _begin(self, text: str, *, boxes, max_new_tokens, temperature, top_p, top_k, seed, iou_threshold,
               special_tokens_in_text, head_options=None) -> Turn:
        """A turn's checked arguments and prompt (stream's, and nxc.runtime.batch's)."""
        gen = self.pipe.manifest.generation
        max_new = check_max_new(max_new_tokens, gen.max_new_tokens)
        sampling = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
        options = self._head_options(head_options)
        for bound in self.pipe.dispatch.heads:
            bound.kind.prepare(self)
        with self.timeline.stage("preprocess"):
            ids, region, user_text = self._prompt(text, boxes, special_tokens_in_text)
        return Turn(ids, region, user_text, max_new, sampling,
                    gen.iou_threshold if iou_threshold is ... else iou_threshold, options)

    def _head_options(self, head_options) -> dict:
        """{kind: options} for this turn, each checked by its kind; a kind this build has no head of is refused."""
        if head_options is None:
            return {}
        if not isinstance(head_options, Mapping):
            raise ValueError(f"head_options must be a mapping {{head kind: options}}, got {head_options!r}")
        out = {}
        for kind, options in head_options.items():
            bound = self.pipe.dispatch.head_of_kind(kind)
            if bound is None:
                raise ValueError(f"head_options names {kind!r}, but this build's heads are "
                                 f"{', '.join(b.head.kind for b in self.pipe.dispatch.heads) or 'none'}")
            out[kind] = bound.kind.check_options(options)
        return out

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

    def _decode(self, logits, hidden, turn: Turn, reply: Reply) -> Iterator[Token | object]:
        """The decode loop (reference §5.2; dispatch from the manifest's heads):

          fed token is a head's trigger? ──yes──▶ head graph(hidden) ─▶ record (e.g. box), emit its slot token,
                 │ no                              next input = its feedback embedding
                 ▼
          pick from logits ─▶ emit; next input = embeddings[token] ─▶ llm step (in-place cache) ─▶ logits, hidden
        """
        tl, choose_token = self.timeline, self._picker(turn.sampling)
        picked = []                     # when the last sampled token's choice began: its host-side decode event

        def pick(lg, n):
            picked.append(time.perf_counter())
            return choose_token(lg, n)

        def timed(head):
            def fire(h):
                with tl.stage(head.stage):
                    return head(h)
            return fire
        heads = {t: timed(b) for t, b in self.pipe.dispatch.triggers.items()}
        for token, found in decode_loop(logits=logits, hidden=hidden, fed=turn.ids[-1], step=self._step, pick=pick,
                                        heads=heads, max_new=turn.max_new, eos=self.pipe.tokens[names.EOS],
                                        room=self.cache.room):
            t0 = picked.pop() if picked else time.perf_counter()
            mark = tl.mark()
            events = self._on_token(reply, token, found)
            tl.add_outside("decode", t0, time.perf_counter(), mark)     # a module call's graphs: their own stages
            tl.mark_first_token()
            yield from events

    def _picker(self, sampling: SamplingParams):
        """pick(logits, n) for the decode loop: the turn's sampling, its own generator, the ids never sampled."""
        rng, banned = sampling.rng(), self.pipe.dispatch.never_sampled
        return lambda lg, n: pick_token(np.asarray(lg, np.float32), sampling, rng, banned=banned)

    def _on_token(self, reply: Reply, token: int, found) -> list:
        """A generated token joins the reply: its Token event, and the head's event when it closes a trigger
        (batch 1 and nxc.runtime.batch alike)."""
        events = []
        if found is not None:
            record = found.head.kind.record(self, found.outputs, reply.text[reply.slot_end:])
            reply.found.append((found.head, record))
        if token is None:                 # the reply ended at its limit right after a head read a hidden
            return events
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

    def _finish(self, reply: Reply, turn: Turn) -> ChatResult:
        """Each head's once-per-reply stage (SAM masks for boxes), then the turn joins the history."""
        closed, made = [], []
        for bound, watch in reply.watches.items():          # what the reply's end completes (a module call)
            for record in getattr(watch, "close", list)():
                reply.found.append((bound, record))
                closed.append(bound.kind.event(len(reply.found) - 1, record))
        for bound in self.pipe.dispatch.heads:
            made += bound.kind.finish(self, [r for b, r in reply.found if b is bound], turn) or []
        reply.late = [e for e in closed + made if e is not None]
        calls = [r for _, r in reply.found if isinstance(r, CallResult)]
        with self.timeline.stage("postprocess"):
            raw = self.pipe.tokenizer.decode(reply.tokens)
            self.history.append(HistoryTurn(turn.user_text, raw))
            fed_back = [b.kind.slot_value(r) for b, r in reply.found]
            self.history_regions |= set(range(len(self.history_slots), len(self.history_slots) + len(turn.region)))
            self.history_slots += list(turn.region) + [v for v in fed_back if v is not None]
            self._turn_values = None
            eos = self.pipe.tokens[names.EOS]
            text = render_reply(raw)
            for bound in self.pipe.dispatch.heads:
                text = bound.kind.render(text, reply.watches.get(bound))
            return ChatResult(text=text, raw_text=raw, token_ids=reply.tokens, prompt_ids=turn.ids,
                              finish_reason="stop" if reply.tokens and reply.tokens[-1] == eos else "length",
                              detections=[d for b, r in reply.found for d in b.kind.detections_of(r)],
                              images=[im for c in calls for im in c.images] + [e for e in made
                                                                                 if isinstance(e, Picture)],
                              calls=calls)

    # -- the public calls ------------------------------------------------------------------------------
    @one_turn
    def stream(self, text: str, *, boxes=None, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               iou_threshold: float | None = ..., timeline: Timeline | None = None,
               special_tokens_in_text: bool = False, num_beams: int = 1, length_penalty: float = 1.0,
               early_stopping: bool | str = False, head_options=None) -> Iterator[Token | Box | Picture | Done]:
        """Yields Token per generated token, Box when a trigger's box is decoded, then Done with the result.
        iou_threshold: masks whose score is below it are dropped (default: the manifest's, 0.3); None keeps all.
        special_tokens_in_text: `<at>`, `</s>`, `<im_start>`... typed in the text (and in earlier turns) become
        tokens, as in the original model; by default they are plain text (nxc.prompt).
        timeline: records the time of every stage (nxc-profile); time spent by the caller between events is not
        counted in any stage.
        num_beams > 1: beam search (Hugging Face's length_penalty / early_stopping semantics, greedy, triggers per
        beam; nxc.decode.beam_search); the events come when the search ends, from the winning beam.
        head_options: {head kind: options} for this turn's heads, e.g. {"signal": {"steps": 4, "seed": 1}} (each kind
        says what it takes: nxc.runtime.heads.<kind>.check_options); the pictures a reply made come as Image events
        after its last token."""
        self.timeline = timeline or NO_TIMELINE
        turn = self._begin(text, boxes=boxes, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                           top_k=top_k, seed=seed, iou_threshold=iou_threshold,
                           special_tokens_in_text=special_tokens_in_text, head_options=head_options)
        check_beams(num_beams, length_penalty, early_stopping, turn.sampling)
        logits, hidden = self._prefill(turn.ids, turn.region)
        reply = Reply()
        if num_beams > 1:
            yield from beam_reply(self, logits, hidden, turn, reply, num_beams=num_beams,
                                  length_penalty=length_penalty, early_stopping=early_stopping)
        else:
            yield from self._decode(logits, hidden, turn, reply)
        if self.pipe.low_memory and any(b.head.finish for b, _ in reply.found):
            self.forget_cache()        # the heads' stages (SAM) run without the KV cache beside them
        result = self._finish(reply, turn)
        self.timeline.finish()
        self.timeline = NO_TIMELINE
        yield from reply.late
        yield Done(result)

    def ask(self, text: str, **kwargs) -> ChatResult:
        result = None
        for ev in self.stream(text, **kwargs):
            if isinstance(ev, Done):
                result = ev.result
        return result

    @one_turn
    def add_turn(self, user_text: str, reply_raw: str, *, boxes=None, reply_boxes=()) -> None:
        """Record an earlier turn without running the model (a stateless server rebuilding a conversation from the
        messages it is sent). `reply_raw` is the reply as decoded (`<at> <boxes>` literal); `reply_boxes` holds the
        normalised box of each of its slots, in order. The next `ask` prefills the whole conversation."""
        boxes_px = check_boxes(boxes, self.width, self.height)
        self._format()                                  # a retrieval build's object list comes first
        _, order = expand_region_refs(user_text, len(boxes_px))
        check_all_boxes_used(order, len(boxes_px))
        reply_boxes = np.asarray(reply_boxes, np.float32).reshape(-1, 4)
        if reply_raw.count(SLOT) != len(reply_boxes):
            raise PromptError(f"an earlier reply has {reply_raw.count(SLOT)} grounded phrase(s) but "
                              f"{len(reply_boxes)} box(es) came with it; send earlier replies back with their boxes")
        region = region_boxes(boxes_px, order, self.width, self.height)
        self.history.append(HistoryTurn(user_text, reply_raw))
        self.history_regions |= set(range(len(self.history_slots), len(self.history_slots) + len(region)))
        self.history_slots += list(region) + list(reply_boxes)
