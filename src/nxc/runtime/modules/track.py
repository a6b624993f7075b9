"""The "track" backend (VITRON's video segmentation and tracking, SEEM there): the call's region on the first frame,
then the segmenter per frame with the box carried from frame to frame:

    frame 0: SAM (sam_encoder, sam_decoder) with the region as its box ─▶ mask ─▶ the mask's box
    frame k: SAM on frame k with frame k-1's mask box ─▶ mask ─▶ its box (an empty mask keeps the previous box)
    ─▶ CallResult.track (a Detection per frame; frame 0's is the call's detection), streamed as a Track event

On an image conversation it is `segment` with one frame. The frames are the conversation's video's
(nxc.runtime.video: sampled evenly, at most 8 by default); each frame is encoded by sam_encoder once."""
from __future__ import annotations

import numpy as np

from nxc import names
from nxc.runtime import preprocess as pp
from nxc.runtime.modules import CallFailed, Track, backend
from nxc.runtime.modules.segment import Segment


def mask_box(mask: np.ndarray) -> np.ndarray | None:
    """The box [x1, y1, x2, y2] (x2 / y2 exclusive, pixels) around a mask's pixels, or None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return None
    return np.asarray([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


@backend("track")
class Tracker(Segment):

    def frame_embedding(self, conv, frame) -> np.ndarray:
        sam = self.pipe.manifest.sam
        with conv.timeline.stage("preprocess"):
            px = pp.sam_pixels(frame, sam.size, mean=sam.mean, std=sam.std, resample=sam.resample)
        with conv.timeline.stage(names.GRAPH_SAM_ENCODER):
            return self.pipe.run_once_per_image(names.GRAPH_SAM_ENCODER, image=px)["image_embedding"]

    def run(self, conv, call, box_px, result):
        if box_px is None:
            raise CallFailed(f"module {call.module!r} ({result.task}) needs a <region> on the first frame to track "
                             "here; the call has none")
        frames = conv.video.frames if conv.video is not None else (conv.image,)
        phrase, box = " ".join(call.instructions), np.asarray(box_px, np.float32)
        for k, frame in enumerate(frames):
            embedding = self.sam_image(conv).embedding() if k == 0 else self.frame_embedding(conv, frame)
            det = self.segment(conv, embedding, box, phrase)
            result.track.append(det)
            following = mask_box(det.mask) if det.mask is not None else None
            if following is not None:
                box = following
        result.detection = result.track[0]

    def event(self, result):
        return Track(result.index, result.track, result)
