"""The shapes generator's training code at tiny sizes (seconds): data, tokenizer, one short run through both stages,
the folder it writes read and exported by nxc's generator path, losses falling on a fixed batch, --resume."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from nxc.shapes.generator_data import caption_of, make_batch, request_captions  # noqa: E402
from nxc.shapes.generator_text import encode_captions, make_text_encoder, write_caption_tokenizer  # noqa: E402
from nxc.shapes.train_generator import (ARCHS, GeneratorTrainConfig, GeneratorTrainError, make_unet,  # noqa: E402
                                        make_vae, train, unet_loss, vae_loss)

TINY = GeneratorTrainConfig(arch="test", vae_steps=6, unet_steps=6, batch_size=4, warmup=2, checkpoint_every=4,
                            sample_steps=2, threads=1)


@pytest.mark.parametrize("phrases, caption", [
    ([], ""),
    ([("red", "circle")], "a red circle"),
    ([("red", "circle"), ("blue", "square")], "a red circle and a blue square"),
    ([("red", "circle"), ("blue", "square"), ("green", "star")], "a red circle, a blue square and a green star"),
])
def test_caption_phrasing(phrases, caption):
    assert caption_of(phrases) == caption


def test_batch_is_seeded_square_and_drops_captions():
    x, caps = make_batch(np.random.default_rng(3), 40, side=16, uncond_prob=0.5)
    x2, caps2 = make_batch(np.random.default_rng(3), 40, side=16, uncond_prob=0.5)
    assert x.shape == (40, 3, 16, 16) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    assert np.array_equal(x, x2) and caps == caps2
    assert 5 < caps.count("") < 35
    assert len(request_captions(0, 5)) == 5


def test_tokenizer_makes_each_caption_word_one_token(tmp_path):
    from transformers import CLIPTokenizer
    tok = CLIPTokenizer.from_pretrained(write_caption_tokenizer(tmp_path, context_length=16))
    ids = tok("a yellow triangle, a green square and a red star").input_ids
    assert tok.convert_ids_to_tokens(ids)[1:-1] == ["a</w>", "yellow</w>", "triangle</w>", ",</w>", "a</w>",
                                                    "green</w>", "square</w>", "and</w>", "a</w>", "red</w>",
                                                    "star</w>"]


def _fixed_batch_losses(tmp_path, stage: str, steps: int = 30) -> list[float]:
    from diffusers import DDPMScheduler
    from transformers import CLIPTokenizer

    from nxc.model.generator import SD15_DDIM_SCHEDULER
    arch = ARCHS["test"]
    torch.manual_seed(0)
    x, caps = make_batch(np.random.default_rng(0), 8, side=arch.image_size, uncond_prob=0.0)
    x = torch.from_numpy(x)
    vae = make_vae(arch)
    if stage == "vae":
        params, fn = list(vae.parameters()), lambda: vae_loss(vae, x, 1e-6)[0]
    else:
        tok = CLIPTokenizer.from_pretrained(write_caption_tokenizer(tmp_path / "tok", context_length=16))
        text = make_text_encoder(tok, width=arch.cross_attention_dim, layers=1, context_length=16)
        unet, ddpm = make_unet(arch), DDPMScheduler.from_config(SD15_DDIM_SCHEDULER)
        vae.requires_grad_(False)
        params = list(unet.parameters()) + list(text.parameters())
        fn = lambda: unet_loss(unet, text, tok, vae, ddpm, x, caps, 16)[0]  # noqa: E731
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(steps):
        torch.manual_seed(1)            # the same noise and timesteps each step: a fixed batch
        loss = fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("stage", ["vae", "unet"])
def test_losses_finite_and_falling_on_a_fixed_batch(tmp_path, stage):
    torch.set_num_threads(1)
    losses = _fixed_batch_losses(tmp_path, stage)
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    train(out, TINY, command="test")
    return out


def test_folder_loads_and_exports(trained, tmp_path):
    from nxc.export.generator import export_generator
    from nxc.model.generator import load_generator, unconditional_conditioning
    unet, vae, scheduler, sizes = load_generator(trained)
    assert (sizes.latent_height, sizes.vae_scale_factor, sizes.context_length, sizes.cross_attention_dim) == (8, 2, 16, 16)
    assert scheduler["beta_schedule"] == "scaled_linear" and scheduler["steps_offset"] == 1
    assert sizes.scaling_factor == pytest.approx(json.loads((trained / "training.json").read_text())
                                                 ["vae_scaling_factor"])
    assert unconditional_conditioning(trained).shape == (1, 16, 16)
    export_generator(trained, tmp_path / "build", precision="fp32", log=lambda *a: None)
    assert (tmp_path / "build" / "graphs" / "denoiser.onnx").is_file()


def test_training_record_and_samples(trained):
    rec = json.loads((trained / "training.json").read_text())
    assert rec["config"]["unet_steps"] == TINY.unet_steps and rec["commands"] == ["test"]
    assert all(np.isfinite(r["mse"]) for r in rec["log"]["unet"]) and rec["log"]["vae"]
    assert (trained / "samples.png").is_file() and (trained / "partial" / "state.pt").is_file()


def test_resume_continues_from_partial(trained, tmp_path):
    import shutil
    out = tmp_path / "again"
    shutil.copytree(trained / "partial", out / "partial")      # a run stopped after unet step 4 of 6
    train(out, replace(TINY, unet_steps=8), resume=True, command="resume")
    rec = json.loads((out / "training.json").read_text())
    assert rec["commands"] == ["test", "resume"] and rec["log"]["unet"][-1]["step"] == 8
    with pytest.raises(GeneratorTrainError, match="seed 0.*seed 5"):
        train(out, replace(TINY, seed=5), resume=True)
    with pytest.raises(GeneratorTrainError, match="no .*state.pt"):
        train(tmp_path / "empty", TINY, resume=True)


def test_decoder_finetune_keeps_the_encoder_and_lowers_the_reconstruction(trained, tmp_path):
    """Stage "decoder": only decoder and post_quant_conv change (the UNet's latents stay valid), the record grows."""
    import shutil

    from diffusers import AutoencoderKL

    from nxc.shapes.generator_data import make_batch
    from nxc.shapes.train_generator import finetune_decoder
    out = tmp_path / "ft"
    shutil.copytree(trained, out, ignore=shutil.ignore_patterns("partial"))
    before = AutoencoderKL.from_pretrained(out / "vae").eval()
    x = torch.from_numpy(make_batch(np.random.default_rng(9), 8, side=16, uncond_prob=0.0)[0])

    def error(vae):
        with torch.no_grad():
            return (vae.decode(vae.encode(x).latent_dist.mode()).sample - x).abs().mean().item()
    finetune_decoder(out, 30, lr=3e-3, batch_size=8, command="ft")
    after = AutoencoderKL.from_pretrained(out / "vae").eval()
    for name, t in before.state_dict().items():
        same = torch.equal(t, after.state_dict()[name])
        assert same == (not name.startswith(("decoder.", "post_quant_conv."))), name
    assert after.config.scaling_factor == before.config.scaling_factor
    assert error(after) < error(before)
    rec = json.loads((out / "training.json").read_text())
    assert rec["commands"][-1] == "ft" and rec["log"]["decoder"][-1]["step"] == 30
    assert rec["decoder_finetune"]["steps"] == 30 and rec["seconds"]["decoder"] > 0
    with pytest.raises(GeneratorTrainError, match="not a trained generator folder"):
        finetune_decoder(tmp_path / "nothing", 2)


@pytest.mark.parametrize("args, message", [
    (["--finetune-decoder", "0"], "--finetune-decoder must be >= 1"),
    (["--steps", "0"], "--steps, --vae-steps and --threads must be >= 1"),
    (["--threads", "0"], "--steps, --vae-steps and --threads must be >= 1"),
    (["--resume"], "--resume: no .*state.pt; start without --resume"),
])
def test_cli_refuses_in_one_line(tmp_path, capsys, args, message):
    import re

    from nxc.shapes.train_generator_cli import main
    try:
        rc = main(["--out", str(tmp_path / "out"), "--arch", "test", *args])
    except SystemExit as e:          # argparse's own refusals
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and re.search(message, err[-1]), err


def test_gligen_stage_trains_gates_and_position_net_on_a_frozen_base(trained, tmp_path):
    """--gligen: the base UNet's weights are kept exactly, the fusers' gates move off 0, and the folder is a GLIGEN
    generator nxc exports (grounding inputs, latent encoder)."""
    import torch
    from diffusers import UNet2DConditionModel

    from nxc.export.generator import export_generator
    from nxc.model.generator import inspect_generator
    from nxc.shapes.train_gligen import GligenTrainConfig, train_gligen
    out = train_gligen(trained, tmp_path / "g", GligenTrainConfig(steps=4, batch_size=4, warmup=1, lr=1e-2, ema_decay=0.0, gate_init=0.0),
                       command="gligen")
    sizes = inspect_generator(out)[3]
    assert (sizes.grounding_objects, sizes.phrase_dim) == (30, 16)
    base = UNet2DConditionModel.from_pretrained(trained / "unet").state_dict()
    gated = UNet2DConditionModel.from_pretrained(out / "unet").state_dict()
    assert all(torch.equal(base[k], gated[k]) for k in base)
    rec = json.loads((out / "training.json").read_text())
    assert rec["new_parameters"] == sum(v.numel() for k, v in gated.items() if k not in base)
    assert rec["commands"] == ["gligen"] and len(rec["log"]) == 1 and np.isfinite(rec["log"][0]["mse"])
    assert any(abs(v) > 1e-3 for v in rec["gates_tanh"].values()), rec["gates_tanh"]
    result = export_generator(out, tmp_path / "build", log=lambda *a: None)
    assert {"latent_encoder", "text_encoder"} <= set(result.graphs)


def test_gligen_cli_refuses_a_folder_that_is_not_a_generator(tmp_path, capsys):
    from nxc.shapes.train_generator_cli import main
    assert main(["--out", str(tmp_path / "o"), "--gligen", str(tmp_path), "--steps", "2"]) == 2
    assert "no unet/; give a trained shapes generator folder" in capsys.readouterr().err
