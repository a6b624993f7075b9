"""The "index" kind (the retrieval family, ChatRex-style): no graph call while decoding. The image's proposals
(the proposals graph, once per image) are the object list the prompt starts with; the reply names objects by index
(`<ground>phrase</ground><objects><objN></objects>`), parsed as its tokens come (nxc.object_index), and each closed
grounding gives a Detection per index, streamed as Box events. Its slot `<objfeat>` carries the object rows of the
prompt (the head's graph, object_features, over the proposals graph's feature map).

    image ─▶ proposals graph ─▶ filter (score, NMS) ─▶ Proposals: boxes, scores, feature map
    prompt: object list = proposals + region boxes ─▶ <objfeat> rows (object_features)
    reply tokens ─▶ ObjectIndexParser ─▶ `</objects>` closes ─▶ Detection per index ─▶ Box events
"""
from __future__ import annotations

import numpy as np

from nxc import names
from nxc.manifest import BuildError
from nxc.prompt import PromptFormat
from nxc.runtime import preprocess as pp
from nxc.runtime.events import Box, Detection
from nxc.runtime.heads import HeadKind, HeadState, register

FEATURES = f"{names.GRAPH_PROPOSALS}:features"     # the head input fed from the proposals graph


class Proposals(HeadState):
    """The conversation's proposals: run once per image, shared by the n completions of a turn."""

    def __init__(self, conv, objects: tuple | None = None):
        super().__init__(conv)
        self._objects = objects

    def twin(self, conv) -> "Proposals":
        return Proposals(conv, self._objects)

    def objects(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(proposal boxes [P,4] normalised square frame, their scores [P], the object encoder's feature map) from
        the proposals graph, once per image; the score threshold and NMS after the graph (nxc.proposal_filter, the
        build's config)."""
        if self._objects is None:
            from nxc.proposal_filter import filter_proposals
            conv = self.conv
            o, pre = conv.pipe.config.objects, conv.pipe.manifest.objects
            with conv.timeline.stage("preprocess"):
                px = pp.clip_pixels(conv.image, pre.size, mean=pre.mean, std=pre.std, resample=pre.resample)
            with conv.timeline.stage(names.GRAPH_PROPOSALS):
                out = conv.pipe.run_once_per_image(names.GRAPH_PROPOSALS, pixels=px)
            boxes, scores = filter_proposals(out["boxes"][0], out["scores"][0], score_threshold=o.score_threshold,
                                             iou_threshold=o.nms_iou, max_out=o.max_proposals)
            self._objects = (boxes, scores, out["features"])
        return self._objects

    def proposals(self) -> tuple[np.ndarray, np.ndarray]:
        """The image's proposals as pixel boxes [P,4] (xyxy on the original image) and their scores [P]; proposal k
        is `<objk>` in the prompt (a reply naming it gives this box)."""
        boxes, scores, _ = self.objects()
        return pp.boxes_to_pixels(boxes, self.conv.width, self.conv.height), scores


@register("index")
class IndexKind(HeadKind):
    """Answers by proposal index: records come from watch(), never from a trigger."""

    def __init__(self, head, pipe):
        super().__init__(head, pipe)
        from nxc.object_index import IndexTokens
        self.tokens = IndexTokens.from_vocab(pipe.manifest.token_id)

    def new_state(self, conv) -> Proposals:
        return Proposals(conv)

    def prepare(self, conv) -> None:
        conv.state(self.name).objects()       # the proposals graph, timed as its own stage (not inside preprocess)

    def prompt_format(self, conv) -> PromptFormat:
        """The first turn lists the proposals (the conversation's first slot values)."""
        boxes = conv.state(self.name).objects()[0]
        if not conv.history and not conv.history_slots:
            conv.history_slots = list(boxes)
        return PromptFormat(objects=len(boxes))

    def image_input(self, conv, source):
        if source == FEATURES:
            return conv.state(self.name).objects()[2]
        return super().image_input(conv, source)

    def watch(self, conv, reply):
        from nxc.object_index import ObjectIndexParser
        values, scores = conv.slot_values(), conv.state(self.name).objects()[1]
        parser = ObjectIndexParser(self.tokens, len(values), self.pipe.tokenizer.decode)

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
