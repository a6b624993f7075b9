"""The "box" kind (NExT-Chat's regression grounding): a box per `<at>` trigger, streamed as a Box event, fed back
into later turns through `<boxes>`, and SAM masks once per reply (finish "sam_masks").

    trigger <at> ─▶ loc_heads(hidden) ─▶ box, seg_prompt ─▶ Detection ─▶ Box event
    reply done ─▶ sam_encoder(image) (once per image: SamImage) ─▶ sam_decoder(all boxes) ─▶ masks
"""
from __future__ import annotations

import threading

import numpy as np

from nxc import names
from nxc.runtime import preprocess as pp
from nxc.runtime.events import Box, Detection
from nxc.runtime.heads import HeadKind, HeadState, register


def phrase(text_before: str) -> str:
    """The words a detection follows: the reply text since the previous slot, last clause, without 'and'."""
    text_before = text_before.replace(names.AT, "")
    for sep in (".", ",", ";", ":", "\n"):
        text_before = text_before.split(sep)[-1]
    words = text_before.strip().split()
    if words and words[0].lower() == "and":
        words = words[1:]
    return " ".join(words)


class _Cell:
    """A value computed once for several conversations on one image (their SAM image embedding)."""

    def __init__(self):
        self.lock, self.value = threading.Lock(), None


class SamImage(HeadState):
    """The conversation's SAM image embedding, encoded the first time a reply needs masks; n completions of one
    turn share one encoding."""

    def __init__(self, conv, cell: _Cell | None = None):
        super().__init__(conv)
        self.cell = cell or _Cell()

    def twin(self, conv) -> "SamImage":
        return SamImage(conv, self.cell)

    def embedding(self) -> np.ndarray:
        """[1,C,S/16,S/16] from the sam_encoder graph, once per image."""
        conv, cell = self.conv, self.cell
        with cell.lock:
            if cell.value is None:
                sam = conv.pipe.manifest.sam
                with conv.timeline.stage("preprocess"):
                    px = pp.sam_pixels(conv.image, sam.size, mean=sam.mean, std=sam.std, resample=sam.resample)
                with conv.timeline.stage("sam_encoder"):
                    cell.value = conv.pipe.run_once_per_image(names.GRAPH_SAM_ENCODER, image=px)["image_embedding"]
            return cell.value


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

    def new_state(self, conv) -> SamImage:
        return SamImage(conv)

    def finish(self, conv, records, turn):
        if self.head.finish != "sam_masks" or not records:
            return []
        s = self.pipe.manifest.sam.size
        image_embedding = conv.state(self.name).embedding()
        with conv.timeline.stage("sam_decoder"):
            boxes_norm = np.stack([d.box_norm for d in records]).astype(np.float32)
            dec = self.pipe.run(names.GRAPH_SAM_DECODER, image_embedding=image_embedding, boxes=boxes_norm * s,
                                seg_prompt=np.stack([d.seg_prompt for d in records]).astype(np.float32))
        with conv.timeline.stage("postprocess"):
            masks = pp.masks_to_image(dec["low_res_masks"], dec["iou"], s, conv.width, conv.height, turn.threshold)
            for k, d in enumerate(records):
                d.mask, d.score = masks[k], float(dec["iou"][k, 0])
        return []
