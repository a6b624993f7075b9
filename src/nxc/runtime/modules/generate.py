"""The "generate" backend (VITRON's image generation, GLIGEN there): the call's instructions (each the text after its
last ':', joined by ", ") through the build's CLIP tokenizer and text_encoder graph, then the generator (numpy
sampler, denoiser, latent decoder) at the build's defaults -> one picture per call, streamed as an Image event.

With a <region> and a GLIGEN generator (generator.sizes.grounding_objects > 0) the picture is grounded: the
instruction is the phrase drawn in the region's box (GLIGEN's boxes and phrases, scheduled sampling for the first
generator.grounding_beta of the steps). The region is read in the frame of the picture being drawn (the generator's
pixels, or fractions of its sides), not of the conversation's image. Without a GLIGEN generator the region is not
used, and the result says so in `note`."""
from __future__ import annotations

import numpy as np

from nxc.runtime.events import Image
from nxc.runtime.modules import Backend, backend, frame_box


@backend("generate")
class Generate(Backend):

    def __init__(self, pipe):
        super().__init__(pipe)
        self._generator = None

    def generator(self):
        if self._generator is None:
            from nxc.runtime.generator import Generator
            self._generator = Generator.from_pipeline(self.pipe)
        return self._generator

    def region_box(self, conv, region, frame: str) -> np.ndarray:
        s = self.pipe.manifest.generator.sizes
        return frame_box(region, frame, s.image_width, s.image_height, "picture being drawn")

    def draw(self, conv, call, result, **kwargs):
        """One picture of the call's instructions (joined by ", "), seeded by its place among the reply's pictures."""
        from nxc.runtime.generator import DrawOptions
        g = self.generator()
        text = ", ".join(call.instructions)
        cond = g.text_conditioning(text, timeline=conv.timeline)
        k = result.picture_base
        pixels, o = g.draw(cond, DrawOptions(seed=k), timeline=conv.timeline, **kwargs)
        result.images.append(Image(index=k, pixels=pixels, seed=o.seed, steps=o.steps, guidance=o.guidance,
                                   scheduler=o.scheduler))

    def run(self, conv, call, box_px, result):
        s = self.pipe.manifest.generator.sizes
        if box_px is None or not s.grounded:
            self.draw(conv, call, result)
            if box_px is not None:
                result.note = ("the region is not used: this build's generator is not GLIGEN's (no grounded "
                               "generation)")
            return
        box = box_px / np.asarray([s.image_width, s.image_height] * 2, np.float32)
        self.draw(conv, call, result, grounding=([", ".join(call.instructions)], box[None]))

    def event(self, result):
        return result.images[0]
