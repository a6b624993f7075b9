"""The generator folder (nxc.model.generator): the tiny one loads as diffusers reads it, its unconditional
conditioning is StableDiffusionPipeline.encode_prompt's, and a folder nxc cannot export is refused in one line."""
import json
import shutil

import numpy as np
import pytest

from nxc.config import GENERATOR_SIZES


def test_tiny_generator_loads_with_its_sizes(tiny_generator):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nxc.model.generator import load_generator
    unet, vae, scheduler, sizes = load_generator(tiny_generator)
    assert isinstance(unet, UNet2DConditionModel) and isinstance(vae, AutoencoderKL)
    assert sizes == GENERATOR_SIZES["tiny"] and (sizes.image_height, sizes.image_width) == (16, 16)
    assert scheduler == json.loads((tiny_generator / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "DDIMScheduler" and scheduler["beta_schedule"] == "scaled_linear"
    assert not unet.training and next(unet.parameters()).dtype.is_floating_point


def test_uncond_is_the_pipelines_negative_prompt_embedding(tiny_generator):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from nxc.model.generator import load_generator, unconditional_conditioning
    unet, vae, scheduler, _ = load_generator(tiny_generator)
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=DDIMScheduler.from_config(scheduler),
        text_encoder=CLIPTextModel.from_pretrained(tiny_generator / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(tiny_generator / "tokenizer"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _, negative = pipe.encode_prompt("a red circle", "cpu", 1, True, negative_prompt=None)
    uncond = unconditional_conditioning(tiny_generator)
    assert uncond.dtype == np.float32 and uncond.shape == (1, 77, 32)
    np.testing.assert_array_equal(uncond, negative.detach().numpy())


def test_uncond_from_a_file_when_there_is_no_text_encoder(tmp_path):
    from nxc.model.generator import inspect_generator, make_tiny_generator, unconditional_conditioning
    folder = make_tiny_generator(tmp_path / "g", seed=3, context_length=16, text_encoder=False)
    assert not (folder / "text_encoder").exists()
    assert inspect_generator(folder)[3].context_length == 16
    np.testing.assert_array_equal(unconditional_conditioning(folder), np.load(folder / "uncond.npy"))


def _edit(folder, rel, **changes):
    path = folder / rel
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _no_uncond(folder):
    shutil.rmtree(folder / "text_encoder")
    shutil.rmtree(folder / "tokenizer")


@pytest.mark.parametrize("damage, message", [
    (lambda f: shutil.rmtree(f / "unet"), "{f}: no unet/config.json (the unet missing); expected a diffusers folder"),
    (lambda f: (f / "vae" / "diffusion_pytorch_model.safetensors").unlink(),
     "{f}/vae: no weights (diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin)"),
    (lambda f: _edit(f, "vae/config.json", _class_name="VQModel"),
     "{f}/vae/config.json: a 'VQModel', not AutoencoderKL; nxc exports a diffusers folder"),
    (lambda f: _edit(f, "unet/config.json", _class_name="UNet2DModel"),
     "{f}/unet/config.json: a 'UNet2DModel', not UNet2DConditionModel"),
    (lambda f: _edit(f, "scheduler/scheduler_config.json", prediction_type="v_prediction"),
     "{f}/scheduler/scheduler_config.json: prediction_type 'v_prediction'; nxc's denoiser graph and samplers take "
     "epsilon prediction"),
    (lambda f: _edit(f, "unet/config.json", addition_embed_type="text_time"),
     "{f}/unet/config.json: {{'addition_embed_type': 'text_time'}} needs conditioning inputs beyond sample"),
    (lambda f: _edit(f, "unet/config.json", in_channels=9),
     "{f}/unet/config.json: in_channels 9 != out_channels 4 (an inpainting or depth UNet)"),
    (_no_uncond, "{f}: no unconditional conditioning: expected text_encoder/ + tokenizer/"),
    (lambda f: (_no_uncond(f), np.save(f / "uncond.npy", np.zeros((1, 77, 16), np.float32))),
     "{f}/uncond.npy: float32 [1, 77, 16], expected float32 [1, L, 32]"),
    (lambda f: _edit(f, "text_encoder/config.json", hidden_size=64),
     "{f}/text_encoder/config.json: hidden_size 64, but the UNet's cross_attention_dim is 32"),
])
def test_a_folder_nxc_cannot_export_is_refused_in_one_line(tiny_generator, tmp_path, damage, message):
    from nxc.model.generator import GeneratorError, load_generator, unconditional_conditioning
    folder = tmp_path / "g"
    shutil.copytree(tiny_generator, folder)
    damage(folder)
    for call in (load_generator, unconditional_conditioning):
        with pytest.raises(GeneratorError) as e:
            call(folder)
        assert "\n" not in str(e.value)
        assert str(e.value).startswith(message.format(f=folder)), str(e.value)


def test_sd15_sizes_without_allocating():
    """make_sd15_generator's UNet and VAE are SD-1.5's (859.5 M + 83.7 M parameters, counted on the meta device)."""
    from nxc.model.generator import SD15_UNET, sd15_numel
    assert sd15_numel() == 859_520_964 + 83_653_863
    assert SD15_UNET == {"cross_attention_dim": 768, "sample_size": 64}


def test_sd15_folder_at_a_scaled_down_size_loads_in_its_dtype(tmp_path):
    """Streamed one module at a time in float16 (the checkpoint's --dtype): diffusers reads it as written, the sizes
    are SD-1.5's (4 blocks: 8x latents, 77 x 768 conditioning), and the same seed gives the same weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from nxc.model.generator import inspect_generator, make_sd15_generator, sd15_numel
    small = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    unet, vae = dict(cross_attention_dim=768, sample_size=64, **small), dict(small, norm_num_groups=32)
    lines = []
    for name in ("a", "b"):
        make_sd15_generator(tmp_path / name, seed=5, dtype=torch.float16, unet=unet, vae=vae, log=lines.append)
    assert inspect_generator(tmp_path / "a")[3] == GENERATOR_SIZES["sd-1.5"]
    got = load_file(str(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors"))
    again = load_file(str(tmp_path / "b" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in got.values()} == {torch.float16}
    assert all(torch.equal(got[k], again[k]) for k in got)
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "a" / "unet", torch_dtype=torch.float16).state_dict()
    assert list(loaded) == list(got) and all(torch.equal(loaded[k], got[k]) for k in got)
    assert sum(v.numel() for v in got.values()) < sd15_numel(unet=unet, vae=vae)
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "uncond.npy"), np.load(tmp_path / "b" / "uncond.npy"))
    assert lines[0].startswith("unet (UNet2DConditionModel), one module at a time")


def test_gligen_sd15_folder_streams_its_scalar_gates(tmp_path):
    """GLIGEN's gates (alpha_attn, alpha_dense) are 0-dim parameters: the one-module-at-a-time writer writes them
    (it once failed on them: `view` of a 0-dim tensor), and diffusers loads the folder as a gated UNet."""
    import torch
    from diffusers import UNet2DConditionModel

    from nxc.model.generator import make_sd15_generator
    small = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1)
    make_sd15_generator(tmp_path / "g", seed=2, dtype=torch.float16, gligen=True,
                        unet=dict(cross_attention_dim=768, sample_size=64, **small), vae=dict(small, norm_num_groups=32))
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "g" / "unet", torch_dtype=torch.float16)
    assert unet.config.attention_type == "gated"
    gates = [p for n, p in unet.named_parameters() if n.endswith(("alpha_attn", "alpha_dense"))]
    assert gates and all(p.ndim == 0 for p in gates)
    assert (tmp_path / "g" / "text_encoder").is_dir()
