"""The "generate" backend (VITRON's image generation, GLIGEN there): each instruction's text (after its last ':')
through the build's CLIP tokenizer and text_encoder graph, then the generator (numpy sampler, denoiser, latent
decoder) at the build's defaults -> one picture per call (its instructions joined by ", "), streamed as an Image
event when it is done.

Grounded generation (GLIGEN's boxes and phrases entering gated attention) is not here yet: the region, if the call
has one, is not used, and the result says so in `note`."""
from __future__ import annotations

from nxc.runtime.events import Image
from nxc.runtime.modules import Backend, backend


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

    def run(self, conv, call, box_px, result):
        """One picture of the call's instructions (joined by ", "), seeded by its place among the reply's pictures."""
        from nxc.runtime.generator import DrawOptions
        g = self.generator()
        cond = g.text_conditioning(", ".join(call.instructions), timeline=conv.timeline)
        k = result.picture_base
        pixels, o = g.draw(cond, DrawOptions(seed=k), timeline=conv.timeline)
        result.images.append(Image(index=k, pixels=pixels, seed=o.seed, steps=o.steps, guidance=o.guidance,
                                   scheduler=o.scheduler))
        if box_px is not None:
            result.note = "the region is not used: grounded generation (GLIGEN) is not in this build yet"

    def event(self, result):
        return result.images[0]
