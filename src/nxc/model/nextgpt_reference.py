"""The generation family's PyTorch reference chat: what a NExT-GPT build's graphs and the runtime are compared with.

    prompt (vicuna_v1.1, one image row) ─▶ prefill (nxc.decode.assemble_prefill) ─▶ nxc.decode.decode_loop
        heads: [IMGk] fed ─▶ keep the hidden of that step; emit [IMGk+1] (the last emits None: the row picks again)
        pick:  nxc.sampling.pick_token, banning [IMG1..3] and the image span (the runtime's Dispatch.never_sampled)
    each complete group [IMG0..3] ─▶ OutputProjector(hiddens [1,4,H], embedding rows [1,4,H]) ─▶ cond [1,L,D]
        ─▶ diffusers' own scheduler (the oracle: DDIMScheduler / EulerDiscreteScheduler / LCMScheduler from the
           folder's scheduler config) on nxc.diffusion.initial_latents(seed + k) x init_noise_sigma; guidance > 1:
           one UNet call on [uncond, cond], eps_u + w (eps_c - eps_u) ─▶ VAE decode ─▶ [H,W,3] uint8 (rounded as
           the runtime rounds)
"""
from __future__ import annotations

import contextlib

from dataclasses import dataclass, field

import numpy as np
import torch

from nxc import names

SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "lcm": "LCMScheduler"}


@dataclass
class DrawingResult:
    text: str
    token_ids: list[int]
    prompt_ids: list[int]
    finish_reason: str
    images: list[np.ndarray] = field(default_factory=list)       # [H,W,3] uint8 each, one per complete group
    conditioning: list[np.ndarray] = field(default_factory=list)  # [1,L,D] float32, the projector's, per picture


class NextGptReferenceChat:
    """Image + text -> reply and pictures; batch 1, float32, greedy or seeded sampling (nxc.sampling)."""

    def __init__(self, *, model, tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        ids = tokenizer.added_token_ids
        self.im_start, self.im_end, self.im_patch = ids[names.IM_START], ids[names.IM_END], ids[names.IM_PATCH]
        self.signals = [ids[t] for t in names.SIGNAL_TOKENS]
        self.eos = tokenizer.eos_id
        self.never_sampled = tuple(sorted({self.im_start, self.im_end, self.im_patch, *self.signals[1:]}))
        self._generator = None

    @classmethod
    def load(cls, ckpt, *, clip_dir=None) -> "NextGptReferenceChat":
        from nxc.model.nextgpt import load_nextgpt
        model, tokenizer = load_nextgpt(ckpt, clip_dir=clip_dir)
        return cls(model=model, tokenizer=tokenizer)

    def generator(self):
        """(unet, vae, scheduler config, sizes, uncond [1,L,D]) of the model's generator folder, loaded once."""
        if self._generator is None:
            from nxc.model.generator import load_generator, unconditional_conditioning
            unet, vae, scheduler, sizes = load_generator(self.model.generator_dir)
            self._generator = (unet, vae, scheduler, sizes, unconditional_conditioning(self.model.generator_dir))
        return self._generator

    @torch.no_grad()
    def prefill(self, image, text: str):
        """-> (prompt ids, [T,H] float32 prefill rows)."""
        from nxc.decode import assemble_prefill
        from nxc.model import processing
        from nxc.prompt import prompt_segments
        segments, _ = prompt_segments(text, num_image_tokens=1)
        ids = self.tokenizer.encode_segments(segments)
        features = self.model.encode_image(processing.clip_preprocess_of(self.model).pixels(image.convert("RGB")))
        rows = self.model.embed_tokens(torch.tensor([ids]))[0].numpy()
        emb = assemble_prefill(ids, rows, image_span=(self.im_start, self.im_end, 1),
                               image_features=lambda: features[0].numpy(), slot=-1, num_slot_values=0,
                               slot_rows=lambda ks: rows[:0])
        return ids, emb

    @torch.no_grad()
    def chat(self, image, text: str, *, max_new_tokens: int = 64, sampling=None, steps: int | None = None,
             guidance: float | None = None, seed: int = 0, scheduler: str | None = None,
             logits_processor=None) -> DrawingResult:
        """One turn. steps / guidance / scheduler: None takes the checkpoint's defaults (config.json "generator");
        picture k of the reply uses seed + k. logits_processor(logits [1,V], n) -> logits: a test's hook (the
        runtime's test boosts the same logits)."""
        from transformers import DynamicCache

        from nxc.decode import decode_loop
        from nxc.sampling import SamplingParams, pick_token
        sampling = sampling or SamplingParams()
        ids, emb = self.prefill(image, text)
        cache = DynamicCache()
        logits, hidden = self.model.llm_step(torch.from_numpy(emb)[None], cache)
        rng = sampling.rng()
        heads = {t: self._signal_head(k) for k, t in enumerate(self.signals)}

        def step(token, x):
            return self.model.llm_step(self.model.embed_tokens(torch.tensor([[token]])), cache)

        def pick(lg, n):
            lg = logits_processor(lg, n) if logits_processor is not None else lg
            return pick_token(lg[0].float().numpy(), sampling, rng, banned=self.never_sampled)
        out, found = [], []
        for token, f in decode_loop(logits=logits, hidden=hidden, fed=ids[-1], step=step, heads=heads,
                                    max_new=max_new_tokens, eos=self.eos, pick=pick):
            if f is not None:
                found.append(f)
            if token is not None:
                out.append(token)
        d = self.model.draw_defaults
        result = DrawingResult(text=self.tokenizer.decode(out), token_ids=out, prompt_ids=ids,
                               finish_reason="stop" if out and out[-1] == self.eos else "length")
        for k, group in enumerate(self.groups(found)):
            cond = self.conditioning(group)
            result.conditioning.append(cond)
            result.images.append(self.draw(cond, steps=steps or d["default_steps"],
                                           guidance=d["default_guidance"] if guidance is None else guidance,
                                           seed=seed + k, scheduler=scheduler or d["default_scheduler"]))
        return result

    def _signal_head(self, k: int):
        nxt = self.signals[k + 1] if k + 1 < len(self.signals) else None
        return lambda hiddens: [(nxt, None, (k, h.reshape(-1).float().numpy())) for h in hiddens]

    def groups(self, found: list[tuple[int, np.ndarray]]) -> list[np.ndarray]:
        """Complete groups, in order: [N,H] each (the runtime's SignalKind.groups rule)."""
        n, out, run = len(self.signals), [], []
        for k, h in found:
            run = [(k, h)] if k == 0 else run + [(k, h)]
            if len(run) == n and [x[0] for x in run] == list(range(n)):
                out.append(np.stack([x[1] for x in run]))
                run = []
        return out

    @torch.no_grad()
    def conditioning(self, hiddens: np.ndarray) -> np.ndarray:
        """[N,H] hiddens of the steps that fed [IMG0..N-1] -> [1,L,D] (+ those tokens' embedding rows)."""
        embeds = self.model.embed_tokens(torch.tensor([self.signals]))
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.model.output_projector(torch.from_numpy(hiddens)[None], embeds).numpy()
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)

    @torch.no_grad()
    def draw(self, cond: np.ndarray, *, steps: int, guidance: float, seed: int, scheduler: str = "ddim") -> np.ndarray:
        """conditioning [1,L,D] -> [H,W,3] uint8 with diffusers' UNet, VAE and scheduler (the oracle)."""
        import diffusers

        from nxc.diffusion import initial_latents
        unet, vae, config, s, uncond = self.generator()
        sched = getattr(diffusers, SCHEDULER_CLASSES[scheduler]).from_config(config)
        c = torch.from_numpy(np.asarray(cond, np.float32))
        both = torch.cat([torch.from_numpy(uncond), c])
        x = torch.from_numpy(initial_latents((1, s.latent_channels, s.latent_height, s.latent_width), seed))
        sched.set_timesteps(steps)
        x = x * sched.init_noise_sigma
        with _lcm_noise_from(np.random.default_rng(seed + 1)) if scheduler == "lcm" else contextlib.nullcontext():
            x = self._denoise(unet, sched, x, c, both, guidance)
        img = (vae.decode(x / s.scaling_factor).sample / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
        return (img * 255).round().astype(np.uint8)

    @staticmethod
    def _denoise(unet, sched, x, c, both, guidance: float):
        """diffusers' text-to-image loop: CFG batched [uncond, cond] when guidance > 1."""
        for t in sched.timesteps:
            if guidance > 1:
                inp = sched.scale_model_input(torch.cat([x, x]), t)
                eu, ec = unet(inp, t, encoder_hidden_states=both).sample.chunk(2)
                eps = eu + guidance * (ec - eu)
            else:
                eps = unet(sched.scale_model_input(x, t), t, encoder_hidden_states=c).sample
            x = sched.step(eps, t, x).prev_sample
        return x


@contextlib.contextmanager
def _lcm_noise_from(rng: np.random.Generator):
    """diffusers' LCMScheduler.step draws its between-step noise with torch (randn_tensor); the runtime's LCM draws it
    from numpy's default_rng(seed + 1) (nxc.runtime.generator). Within this block diffusers' LCM takes the same
    numpy draws, in the same order, so the reference and the runtime compare step for step."""
    import diffusers.schedulers.scheduling_lcm as lcm
    real = lcm.randn_tensor

    def numpy_noise(shape, generator=None, device=None, dtype=None, **_):
        return torch.from_numpy(rng.standard_normal(tuple(shape), dtype=np.float32)).to(dtype=dtype)
    lcm.randn_tensor = numpy_noise
    try:
        yield
    finally:
        lcm.randn_tensor = real
