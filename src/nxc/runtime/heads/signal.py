"""The "signal" kind (NExT-GPT): a reply that says [IMG0] [IMG1] [IMG2] [IMG3] asks for a picture. The first signal
token is sampled; the others are emitted after it (never sampled), and the hidden of each is kept (the llm's
post-final-norm hidden at the step that fed it: NExT-GPT's training positions; its original inference read one
position earlier). Once the reply ends, each complete group of N becomes a picture:

    hiddens [1,N,H] + the signal tokens' embedding rows [1,N,H] ─▶ projector graph ─▶ conditioning [1,L,D]
        ─▶ nxc.runtime.generator (numpy sampler, denoiser, latent_decoder) ─▶ Image event, ChatResult.images

Per turn: head_options={"signal": {"steps", "guidance", "seed", "scheduler"}} (defaults: the build's); a group's
picture k uses seed + k. A reply cut before its last signal token makes no picture. The reply's text is shown without
the signal tokens (render; ChatResult.raw_text and the streamed Token events keep them).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nxc.runtime.events import Image
from nxc.runtime.heads import HeadKind, register


@dataclass
class SignalHidden:
    """The hidden of signal token k of a group (a record that only feeds finish)."""
    k: int
    hidden: np.ndarray         # [H] float32


@register("signal")
class SignalKind(HeadKind):
    """Signal tokens -> a picture per complete group, once a reply (finish "generate")."""

    detections = False

    def __init__(self, head, pipe):
        super().__init__(head, pipe)
        self._generator = None

    def generator(self):
        if self._generator is None:
            from nxc.runtime.generator import Generator
            self._generator = Generator.from_pipeline(self.pipe)
        return self._generator

    def record(self, conv, outputs, text_before):
        return SignalHidden(int(outputs["signal"]), np.asarray(outputs["hidden"], np.float32))

    def slot_value(self, record):
        return None                              # nothing of a picture is fed back into later turns

    def render(self, text: str, watch) -> str:
        """The reply as shown: without the signal tokens' group ("Sure, a red circle." and its picture; raw_text
        keeps "[IMG0][IMG1][IMG2][IMG3]"), as the pictures stand for them."""
        return text.replace(self.group(), "") if self.group() else text

    def group(self) -> str:
        """The signal tokens as they read in a reply ("[IMG0][IMG1][IMG2][IMG3]")."""
        return self.pipe.tokenizer.decode(list(self.bound.signals)).strip()

    def check_options(self, options):
        from nxc.runtime.generator import DrawOptions
        return DrawOptions.parse(options)

    def groups(self, records: list[SignalHidden]) -> list[np.ndarray]:
        """The complete groups, in order: [N,H] hiddens each (signal 0..N-1 in a row)."""
        n, out, run = len(self.head.signals), [], []
        for r in records:
            run = [r] if r.k == 0 else run + [r]
            if len(run) == n and [x.k for x in run] == list(range(n)):
                out.append(np.stack([x.hidden for x in run]))
                run = []
        return out

    def finish(self, conv, records, turn):
        from nxc.runtime.generator import DrawOptions
        groups = self.groups(records)
        if not groups or self.head.finish != "generate":
            return []
        options = turn.head_options.get(self.name) or DrawOptions()
        embeds = np.asarray(self.pipe.embeddings[[self.pipe.manifest.token_id(t) for t in self.head.signals]],
                            np.float32)[None]
        pictures = []
        for k, hiddens in enumerate(groups):
            with conv.timeline.stage(self.head.graph):
                out = self.bound.run({"hidden": hiddens[None], "signal_embeds": embeds})
            cond = out[self.head.collect[0]] if self.head.collect else next(iter(out.values()))
            used = DrawOptions(steps=options.steps, guidance=options.guidance, seed=options.seed + k,
                               scheduler=options.scheduler)
            pixels, o = self.generator().draw(cond, used, timeline=conv.timeline)
            pictures.append(Image(index=k, pixels=pixels, seed=o.seed, steps=o.steps, guidance=o.guidance,
                                  scheduler=o.scheduler))
        return pictures
