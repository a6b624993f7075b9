"""The "segment" backend (VITRON's image segmentation, SEEM there): the call's region as a box prompt to the build's
SAM (sam_encoder once per image, sam_decoder per call) -> a Detection with the mask, streamed as a Mask event.

A call without a region has nothing to point SAM at here: it fails with that reason (grounding the instruction's
phrase first is a later step)."""
from __future__ import annotations

import numpy as np

from nxc import names
from nxc.runtime import preprocess as pp
from nxc.runtime.events import Detection
from nxc.runtime.heads.box import SamImage
from nxc.runtime.modules import Backend, CallFailed, Mask, backend


@backend("segment")
class Segment(Backend):

    def sam_image(self, conv) -> SamImage:
        """The image's SAM embedding: the box head's when the build has one (encoded once for both), else the
        modules' own."""
        if conv.pipe.dispatch.head_of_kind("box") is not None:
            return conv.state("box")
        shared = conv.state("module").shared
        if "sam" not in shared:
            shared["sam"] = SamImage(conv)
        return shared["sam"]

    def run(self, conv, call, box_px, result):
        if box_px is None:
            raise CallFailed(f"module {call.module!r} ({result.task}) needs a <region> to segment here; the "
                             "call has none")
        result.detection = self.segment(conv, self.sam_image(conv).embedding(), box_px, " ".join(call.instructions))

    def segment(self, conv, embedding: np.ndarray, box_px: np.ndarray, phrase: str) -> Detection:
        """The object in `box_px` (pixels of the conversation's image size) on the image whose SAM `embedding` is
        given: one sam_decoder call with the box as its prompt."""
        s = self.pipe.manifest.sam.size
        box_norm = pp.normalise_boxes(box_px[None], conv.width, conv.height)[0]
        spec = {t.name: t for t in self.pipe.manifest.graph_spec(names.GRAPH_SAM_DECODER).inputs}
        feeds = {"image_embedding": embedding, "boxes": (box_norm * s)[None].astype(np.float32)}
        if "seg_prompt" in spec:        # NExT-Chat's decoder also takes the box head's prompt rows: none here
            shape = spec["seg_prompt"].resolve({a: 1 for a in spec["seg_prompt"].dynamic_axes().values()})
            feeds["seg_prompt"] = np.zeros(shape, np.float32)
        with conv.timeline.stage(names.GRAPH_SAM_DECODER):
            dec = self.pipe.run(names.GRAPH_SAM_DECODER, **feeds)
        with conv.timeline.stage("postprocess"):
            masks = pp.masks_to_image(dec["low_res_masks"], dec["iou"], s, conv.width, conv.height, None)
        return Detection(box=box_px, box_norm=box_norm, phrase=phrase, mask=masks[0], score=float(dec["iou"][0, 0]))

    def event(self, result):
        return Mask(result.index, result.detection, result)
