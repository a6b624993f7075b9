"""Helpers of the GLIGEN tests (tests/export/test_gligen.py, tests/runtime/test_module_gligen.py): the runtime's
Generator on exported graphs, and diffusers' StableDiffusionGLIGENPipeline on the same folder as the oracle, its torch
draws replaced by the runtime's."""
import numpy as np

STEPS, GUIDANCE, BETA = 10, 7.5, 0.3            # 3 grounded steps of 10


def runtime_generator(out, result):
    """The runtime's Generator on the exported graphs (ONNX Runtime, CPU)."""
    import onnxruntime as ort

    from nxc.clip_tokenizer import ClipTokenizer
    from nxc.config import GeneratorSizes
    from nxc.manifest_types import GeneratorEntry
    from nxc.runtime.generator import Generator
    e = dict(result.entry)
    entry = GeneratorEntry(sizes=GeneratorSizes.from_dict(e.pop("sizes")), **e)
    sessions = {g: ort.InferenceSession(str(out / r["file"]), providers=["CPUExecutionProvider"])
                for g, r in result.graphs.items()}

    def run(graph, **feeds):
        s = sessions[graph]
        return dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds)))
    return Generator(entry=entry, uncond=np.load(out / "uncond.npy"), run=run,
                     tokenizer=entry.tokenizer and ClipTokenizer.from_folder(out / entry.tokenizer))


def reference_pipeline(folder):
    import torch
    from diffusers import DDIMScheduler, StableDiffusionGLIGENPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from nxc.model.generator import _quiet, load_generator
    unet, vae, config, _ = load_generator(folder)
    with _quiet():
        pipe = StableDiffusionGLIGENPipeline(
            vae=vae, unet=unet, scheduler=DDIMScheduler.from_config(config),
            text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch.float32).eval(),
            tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_picture(pipe, prompt, latents, **kwargs) -> np.ndarray:
    """The pipeline's picture, [H,W,3] float in [0, 1] (output_type "np"). Inpainting with a generation UNet (4 input
    channels): the pipeline always appends [masked source latents, mask] to the UNet's input, so its UNet is given
    them and drops them (the blend alone, what the runtime does with such a UNet)."""
    import torch
    forward = pipe.unet.forward
    if kwargs.get("gligen_inpaint_image") is not None and pipe.unet.config.in_channels == 4:
        pipe.unet.forward = lambda sample, *a, **k: forward(sample[:, :4], *a, **k)
    try:
        with torch.no_grad():
            return pipe(prompt=prompt, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
                        guidance_scale=GUIDANCE, gligen_scheduled_sampling_beta=BETA, output_type="np",
                        **kwargs).images[0]
    finally:
        if "forward" in vars(pipe.unet):
            del pipe.unet.forward


def as_float(pixels_uint8):
    return pixels_uint8.astype(np.float64) / 255


def replay_draws(monkeypatch, seed, shape):
    """Replace the pipeline's torch draws (the VAE posterior's randn_tensor, the per-step torch.randn_like) by the
    runtime's: np.random.default_rng(seed + 2), one standard normal of `shape` per draw, in order."""
    import torch

    import diffusers.models.autoencoders.vae as vae_module
    rng = np.random.default_rng(seed + 2)

    def draw(*_a, **_k):
        return torch.from_numpy(rng.standard_normal(shape, dtype=np.float32))
    monkeypatch.setattr(vae_module, "randn_tensor", draw)
    monkeypatch.setattr(torch, "randn_like", lambda x, *a, **k: draw())


