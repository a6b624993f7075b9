"""Trigger-token dispatch as data: the build manifest's `heads`, bound to token ids and graphs (DESIGN "Trigger-token
dispatch"). A new head is a manifest entry (and, for new behaviour, a kind registered here), never a new branch in
the decode loop.

    manifest head                                   kind (registry)
    trigger <at> ─▶ graph loc_heads                 "box": what the outputs mean (a Detection: pixel box,
      inputs  {hidden: hidden, boxes: zeros}          phrase), the event streamed (Box), the slot value kept for
      collect [box, seg_prompt]                       later turns (box_norm), and the finish stage run once per
      feedback feedback ─▶ next input, emit <boxes>   reply ("sam_masks": SAM decoder for all its detections)
      encode  boxes ─▶ loc_embeds (the emitted slot's input rows for region boxes and earlier replies)

    triggers = Dispatch(pipe).triggers          # {trigger id: BoundHead}; BoundHead([hidden]) -> [(emit, x, Found)]
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nxc import names
from nxc.manifest import BuildError, Head
from nxc.runtime import preprocess as pp

KINDS: dict[str, type["HeadKind"]] = {}


def register(name: str):
    """Class decorator: make a HeadKind available to manifest heads of `"kind": name`."""
    def add(cls):
        KINDS[name] = cls
        return cls
    return add


@dataclass
class Found:
    head: "BoundHead"
    outputs: dict[str, np.ndarray]     # the collected outputs of this trigger, first row of each


class HeadKind:
    """What a head's outputs mean. One instance per head of a loaded build."""

    def __init__(self, head: Head, pipe):
        self.head, self.pipe = head, pipe

    def record(self, conv, outputs: dict[str, np.ndarray], text_before: str):
        """The reply's record of one trigger (`text_before`: the reply text since the previous slot)."""
        raise NotImplementedError

    def event(self, index: int, record):
        """What `stream` yields when the trigger fires (None: nothing)."""
        return None

    def slot_value(self, record) -> np.ndarray:
        """The value a later turn encodes into this trigger's emitted slot (through the head's encode graph)."""
        raise NotImplementedError

    def finish(self, conv, records: list, threshold) -> None:
        """Once per reply, after the last token, for this head's records (e.g. SAM masks)."""

    def watch(self, conv, reply) -> "object | None":
        """A head that reads the reply's tokens as they come (no trigger): an object with feed(token) -> the
        records the token completes; None for a head fired by its trigger."""
        return None

    def render(self, text: str, watch) -> str:
        """The reply as shown (after nxc.prompt.render_reply), for a head that watched it (`watch`, its watcher)."""
        return text


@dataclass
class Detection:
    box: np.ndarray            # [4] xyxy pixels on the original image (not clamped, as the reference)
    box_norm: np.ndarray       # [4] normalised xyxy in the padded square (what loc_decoder gave)
    phrase: str                # the reply text this detection follows, e.g. "a blue circle"
    mask: np.ndarray | None = None    # [H,W] bool (all False when the mask score is under the threshold)
    score: float | None = None        # SAM's IoU prediction for the mask
    seg_prompt: np.ndarray | None = None   # [4,C] for the SAM decoder


@dataclass
class Box:
    index: int
    detection: Detection       # box known now; mask and score come with Done


def phrase(text_before: str) -> str:
    """The words a detection follows: the reply text since the previous slot, last clause, without 'and'."""
    text_before = text_before.replace(names.AT, "")
    for sep in (".", ",", ";", ":", "\n"):
        text_before = text_before.split(sep)[-1]
    words = text_before.strip().split()
    if words and words[0].lower() == "and":
        words = words[1:]
    return " ".join(words)


@register("box")
class BoxKind(HeadKind):
    """A box per trigger (outputs `box`, `seg_prompt`); finish "sam_masks": one SAM decoder call per reply."""

    def record(self, conv, outputs, text_before):
        box = outputs["box"]
        return Detection(box=pp.boxes_to_pixels(box[None], conv.width, conv.height)[0], box_norm=box,
                         phrase=phrase(text_before), seg_prompt=outputs.get("seg_prompt"))

    def event(self, index, record):
        return Box(index, record)

    def slot_value(self, record):
        return record.box_norm

    def finish(self, conv, records, threshold):
        if self.head.finish != "sam_masks" or not records:
            return
        s = self.pipe.manifest.sam.size
        image_embedding = conv.sam_embedding()
        with conv.timeline.stage("sam_decoder"):
            boxes_norm = np.stack([d.box_norm for d in records]).astype(np.float32)
            dec = self.pipe.run(names.GRAPH_SAM_DECODER, image_embedding=image_embedding, boxes=boxes_norm * s,
                                seg_prompt=np.stack([d.seg_prompt for d in records]).astype(np.float32))
        with conv.timeline.stage("postprocess"):
            masks = pp.masks_to_image(dec["low_res_masks"], dec["iou"], s, conv.width, conv.height, threshold)
            for k, d in enumerate(records):
                d.mask, d.score = masks[k], float(dec["iou"][k, 0])


@register("index")
class IndexKind(HeadKind):
    """The retrieval family's answers by proposal index (nxc.object_index): no graph call while decoding; the
    reply's tokens are parsed as they come and `</objects>` closing a grounding gives a Detection per index (the
    object list's box: a proposal, or a region box), streamed as Box events. Its slot `<objfeat>` carries the
    object rows of the prompt (the head's graph, object_features, over the proposals graph's feature map)."""

    def __init__(self, head, pipe):
        super().__init__(head, pipe)
        from nxc.object_index import IndexTokens
        self.tokens = IndexTokens.from_vocab(pipe.manifest.token_id)

    def watch(self, conv, reply):
        from nxc.object_index import ObjectIndexParser
        parser = ObjectIndexParser(self.tokens, len(conv.object_values()), self.pipe.tokenizer.decode)
        values, scores = conv.object_values(), conv.objects()[1]

        class Watch:
            groundings, num_objects = parser.groundings, len(values)

            def feed(self, token: int) -> list:
                g = parser.feed(token)
                if g is None:
                    return []
                return [Detection(box=pp.boxes_to_pixels(values[i][None], conv.width, conv.height)[0],
                                  box_norm=values[i], phrase=g.phrase,
                                  score=float(scores[i]) if i < len(scores) else None) for i in g.indices]
        return Watch()

    def record(self, conv, outputs, text_before):
        raise BuildError("an index head has no trigger; its records come from watch()")

    def event(self, index, record):
        return Box(index, record)

    def slot_value(self, record):
        return None                              # a reply names objects by index: no slot row to feed back

    def render(self, text: str, watch) -> str:
        from nxc.object_index import render
        return render(text, watch.num_objects)


class BoundHead:
    """A manifest head with its token ids, its graph's zero inputs and its kind."""

    def __init__(self, head: Head, pipe, index: int):
        if head.kind not in KINDS:
            raise BuildError(f"{pipe.manifest.root / 'manifest.json'}: heads[{index}].kind {head.kind!r} is not a kind "
                             f"this runtime knows ({', '.join(sorted(KINDS))}); use the nxc that wrote the build")
        self.head, self.pipe = head, pipe
        self.trigger = None if head.trigger is None else pipe.manifest.token_id(head.trigger)
        self.emit = pipe.manifest.token_id(head.emit)
        self.kind = KINDS[head.kind](head, pipe)
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

    def encode(self, values: np.ndarray, conv=None, slots=None) -> np.ndarray:
        """[k, ...] slot values -> [k, H] input rows of the emitted slot token (region input, earlier replies, a
        retrieval prompt's objects). Inputs fed from "<graph>:<output>" come from `conv`'s once-per-image runs,
        "slot_index" inputs are `slots` (each value's place among the prompt's slots)."""
        h = self.head
        if h.encode_input is None:
            raise BuildError(f"head {h.kind!r} has no encode graph input; its slots cannot be fed back")

        def feed(name: str, source: str) -> np.ndarray:
            if ":" in source:
                return conv.image_output(source)
            if source == "slot_index":
                return np.asarray(slots, np.int64)
            return self._zeros[name]
        feeds = {name: feed(name, source) for name, source in h.inputs.items()}
        feeds[h.encode_input] = np.asarray(values, self._zeros[h.encode_input].dtype)
        return self.pipe.run(h.graph, **feeds)[h.encode_output]


class Dispatch:
    """The build's heads, bound. `triggers`: {trigger id: BoundHead}; `slot_head`: the head whose emitted slot
    carries region input (the first with an encode graph), or None."""

    def __init__(self, pipe):
        self.heads = [BoundHead(h, pipe, i) for i, h in enumerate(pipe.manifest.heads)]
        self.triggers = {b.trigger: b for b in self.heads if b.trigger is not None}
        self.index_head = next((b for b in self.heads if b.head.kind == "index"), None)
        # heads that read the reply's tokens (their kind has a watcher): the only ones _on_token asks each token
        self.watchers = [b for b in self.heads if type(b.kind).watch is not HeadKind.watch]
        self.slot_head = next((b for b in self.heads if b.head.encode_input), None)
        # Never sampled (nxc.sampling.pick_token's `banned`): a head's emitted slot comes only after its trigger,
        # and the image span only where the prompt puts it; the reference bans the same ids (TokenIds.never_sampled).
        self.never_sampled = tuple(sorted({b.emit for b in self.heads} | {
            pipe.manifest.token_id(t) for t in (names.IM_START, names.IM_PATCH, names.IM_END)}))
