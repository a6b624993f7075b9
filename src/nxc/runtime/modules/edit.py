"""The "edit" backend (VITRON's image editing: SEEM's mask, then GLIGEN's grounded inpainting there): the call's
region on the conversation's image is redrawn as its instructions say, the rest of the picture kept.

    conversation's image ─ centre crop to the generator's aspect, LANCZOS resize to its size (the GLIGEN pipeline's
      target_size_center_crop) ─▶ latent_encoder ─▶ source latents
    region (the image's frame) ─ through the crop ─▶ a box in [0, 1] ─▶ GLIGEN: phrase = the instructions, in the box;
      each step the source, noised to the step, replaces the latents outside the box
    ─▶ the edited picture (the generator's size), streamed as an Image event

A call without a region has nothing to edit here (finding the instruction's object first is the segmenter's work,
a later step): it fails with that reason."""
from __future__ import annotations

import numpy as np
from PIL import Image as PILImage

from nxc.runtime.modules import CallFailed, backend
from nxc.runtime.modules.generate import Generate


def crop_to(image: PILImage.Image, width: int, height: int) -> tuple[PILImage.Image, np.ndarray]:
    """(the centred crop of `image` with the aspect width : height, resized to width x height with LANCZOS; its
    [left, top, side_x, side_y] in the image's pixels). A square generator crops to min(w, h) as
    StableDiffusionGLIGENPipeline.target_size_center_crop does."""
    w, h = image.size
    scale = min(w / width, h / height)
    cw, ch = width * scale, height * scale
    left, top = (w - cw) / 2, (h - ch) / 2
    if (w, h) != (round(cw), round(ch)):
        image = image.crop((left, top, left + cw, top + ch))
    if image.size != (width, height):
        image = image.resize((width, height), PILImage.LANCZOS)
    return image, np.asarray([left, top, cw, ch], np.float64)


@backend("edit")
class Edit(Generate):

    def region_box(self, conv, region, frame: str) -> np.ndarray:
        return super(Generate, self).region_box(conv, region, frame)         # the conversation's image

    def run(self, conv, call, box_px, result):
        if box_px is None:
            raise CallFailed(f"module {call.module!r} ({result.task}) needs a <region> to edit here; the call has none")
        s = self.pipe.manifest.generator.sizes
        picture, (left, top, cw, ch) = crop_to(conv.image, s.image_width, s.image_height)
        box = (np.asarray(box_px, np.float64) - [left, top, left, top]) / [cw, ch, cw, ch]
        box = np.clip(box, 0, 1)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise CallFailed(f"region {list(call.region)} is outside the centre of the image the generator edits "
                             f"({cw:.0f} x {ch:.0f} from ({left:.0f}, {top:.0f}))")
        self.draw(conv, call, result, grounding=([", ".join(call.instructions)], box[None]),
                  source=np.asarray(picture, np.uint8))
