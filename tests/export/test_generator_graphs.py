"""The generator's graphs (nxc.export.generator): ONNX Runtime equals torch at batch 1 and 2 (fp32), fp16 and int8
stay within their bounds of fp32, an fp16 VAE decoder that overflows ships float32 and says why, and the whole
denoise loop through the graphs equals diffusers' StableDiffusionPipeline on the same latents."""
import shutil

import numpy as np
import pytest

from nxc import names
from nxc.config import GENERATOR_SIZES
from nxc.specs import generator_specs

QUIET = {"log": lambda _m: None}


def test_fp32_graphs_match_torch_at_batch_1_and_2(tiny_generator_fp32):
    out, result = tiny_generator_fp32
    specs = generator_specs(GENERATOR_SIZES["tiny"])
    assert set(result.graphs) == set(specs) == set(result.parity) == {"denoiser", "latent_decoder"}
    for g, rec in result.graphs.items():
        assert (out / rec["file"]).is_file() and rec["external_data"] == [] and rec["precision"] == "fp32"
        assert {k: rec[k] for k in ("inputs", "outputs")} == specs[g].to_dict()
        assert rec["tensorrt_lint"]["ok"], rec["tensorrt_lint"]["problems"]
        report = result.parity[g]
        assert report["ok"] and [c["axes"] for c in report["checks"]] == [{"batch": 1}, {"batch": 2}]
        for check in report["checks"]:
            assert all(o["max_abs"] < 1e-4 for o in check["outputs"].values()), check
    assert result.accuracy is None
    assert np.load(out / "uncond.npy").shape == (1, 77, 32)
    assert result.entry == {
        "sizes": GENERATOR_SIZES["tiny"].to_dict(), "denoiser": "denoiser", "decoder": "latent_decoder",
        "scheduler": result.entry["scheduler"], "default_scheduler": "ddim", "default_steps": 50,
        "default_guidance": 7.5, "uncond_file": "uncond.npy", "pixel_format": "rgb01"}
    assert result.entry["scheduler"]["prediction_type"] == "epsilon"
    assert not list(out.glob(".*")), "scratch left behind"


def test_fp16_graphs_stay_close_to_fp32(tiny_generator, tmp_path):
    from nxc.export.generator import export_generator
    result = export_generator(tiny_generator, tmp_path, precision="fp16", **QUIET)
    assert {g: r["precision"] for g, r in result.graphs.items()} == {"denoiser": "fp16", "latent_decoder": "fp16"}
    assert all(r["ok"] for r in result.parity.values())
    check = result.accuracy["fp16_decoder_check"]
    assert check["ok"] and check["non_finite_pixels"] == 0 and check["max_abs"] < 2e-3, check
    acc = result.accuracy["graphs"]
    assert acc["denoiser"]["noise"]["cosine"] > 0.9999 and acc["denoiser"]["noise"]["max_abs"] < 1e-2, acc
    assert acc["latent_decoder"]["pixels"]["max_abs"] < 2e-3, acc
    assert all("fp32_nodes" in r for r in result.graphs.values())
    assert not list(tmp_path.glob(".*")), "scratch left behind"


def test_int8_quantizes_the_denoiser_and_keeps_the_decoder_fp32(tiny_generator, tmp_path):
    from nxc.export.generator import KEPT_FP32_AT_INT8, export_generator
    result = export_generator(tiny_generator, tmp_path, precision="int8", **QUIET)
    den, dec = result.graphs["denoiser"], result.graphs["latent_decoder"]
    assert den["precision"] == "int8-weight-only" and den["quantization"]["weights_quantized"] > 0
    assert den["tensorrt_lint"]["ok"] and "DequantizeLinear" in den["tensorrt_lint"]["ops"]
    assert dec["precision"] == "fp32" and dec["fp32_reason"] == KEPT_FP32_AT_INT8
    acc = result.accuracy["graphs"]["denoiser"]["noise"]
    assert acc["cosine"] > 0.999 and acc["max_abs"] < 2e-2, acc


def test_a_large_int8_denoiser_keeps_its_weights_in_external_data(tiny_generator, tmp_path, monkeypatch):
    """At SD-1.5's size the int8 denoiser's float convolutions alone pass protobuf's 2 GB: a denoiser whose fp32
    graph is over EXTERNAL_DATA_BYTES is written with one external data file beside it (the threshold lowered to
    0 here), and it runs as the inline one does."""
    import onnxruntime as ort

    from nxc.export.generator import export_generator
    inline = export_generator(tiny_generator, tmp_path / "inline", precision="int8", **QUIET).graphs["denoiser"]
    monkeypatch.setattr("nxc.export.exporter.EXTERNAL_DATA_BYTES", 0)
    result = export_generator(tiny_generator, tmp_path / "ext", precision="int8", **QUIET)
    den = result.graphs["denoiser"]
    assert inline["external_data"] == [] and den["external_data"] == ["graphs/denoiser.onnx.data"]
    assert (tmp_path / "ext" / "graphs" / "denoiser.onnx.data").stat().st_size > 0
    assert result.accuracy["graphs"]["denoiser"]["noise"]["cosine"] > 0.999
    feeds = {i.name: np.random.default_rng(0).standard_normal(
        [2 if isinstance(d, str) else d for d in i.shape]).astype(np.float32)
        for i in ort.InferenceSession(str(tmp_path / "inline" / inline["file"])).get_inputs()}
    feeds = {k: (v if k != "timestep" else np.full(v.shape, 500, np.float32)) for k, v in feeds.items()}
    a, b = (ort.InferenceSession(str(d / r["file"])).run(None, feeds)[0]
            for d, r in ((tmp_path / "inline", inline), (tmp_path / "ext", den)))
    np.testing.assert_array_equal(a, b)


def test_an_fp16_vae_that_overflows_ships_fp32_and_says_why(tiny_generator, tmp_path):
    """A decoder whose first convolution's outputs exceed fp16's 65504: float32 decodes it (the next GroupNorm
    scales them back), fp16 makes inf, then NaN: the known black-picture trap."""
    from diffusers import AutoencoderKL

    from nxc.export.generator import export_generator
    folder = tmp_path / "overflowing"
    shutil.copytree(tiny_generator, folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    vae.decoder.conv_in.weight.data *= 1e6
    vae.save_pretrained(folder / "vae")
    result = export_generator(folder, tmp_path / "build", precision="fp16", **QUIET)
    dec = result.graphs["latent_decoder"]
    check = result.accuracy["fp16_decoder_check"]
    assert not check["ok"] and check["non_finite_pixels"] > 0, check
    assert dec["precision"] == "fp32" and dec["fp32_reason"].startswith("fp16 VAE decoder overflowed: "), dec
    assert result.parity["latent_decoder"]["ok"] and "latent_decoder" not in result.accuracy["graphs"]
    assert result.graphs["denoiser"]["precision"] == "fp16"
    pixels = _session(tmp_path / "build" / dec["file"]).run(None, {"latents": np.ones((1, 4, 8, 8), np.float32)})[0]
    assert np.isfinite(pixels).all()


def _session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_the_onnx_loop_equals_diffusers_pipeline(tiny_generator, tiny_generator_fp32):
    """20 DDIM steps, guidance 7.5, same latents and conditioning: the graphs in ONNX Runtime (one batched
    [uncond, cond] denoiser call a step, diffusers' DDIMScheduler stepping) against StableDiffusionPipeline."""
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from nxc.model.generator import load_generator
    out, result = tiny_generator_fp32
    unet, vae, config, _ = load_generator(tiny_generator)
    uncond = np.load(out / "uncond.npy")
    cond = np.random.default_rng(0).standard_normal(uncond.shape).astype(np.float32)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=DDIMScheduler.from_config(config), text_encoder=None,
                                   tokenizer=None, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt_embeds=torch.from_numpy(cond), negative_prompt_embeds=torch.from_numpy(uncond),
                latents=latents, num_inference_steps=20, guidance_scale=7.5)
    with torch.no_grad():
        want_latents = pipe(**call, output_type="latent").images.numpy()
        want = pipe(**call, output_type="np").images.transpose(0, 3, 1, 2)        # [1, 3, H, W]

    denoiser, decoder = (_session(out / result.graphs[g]["file"]) for g in (names.GRAPH_DENOISER,
                                                                            names.GRAPH_LATENT_DECODER))
    scheduler = DDIMScheduler.from_config(result.entry["scheduler"])
    scheduler.set_timesteps(20)
    x, context = latents.numpy() * scheduler.init_noise_sigma, np.concatenate([uncond, cond])
    for t in scheduler.timesteps:
        noise = denoiser.run(None, {"sample": np.concatenate([x, x]), "timestep": np.full(2, float(t), np.float32),
                                    "encoder_hidden_states": context})[0]
        guided = noise[:1] + 7.5 * (noise[1:] - noise[:1])
        x = scheduler.step(torch.from_numpy(guided), t, torch.from_numpy(x)).prev_sample.numpy()
    pixels = decoder.run(None, {"latents": x})[0]
    assert np.abs(x - want_latents).max() <= 1e-4 * max(1.0, np.abs(want_latents).max())
    assert pixels.shape == want.shape == (1, 3, 16, 16)
    assert np.abs(pixels - want).max() <= 1e-3
    assert 0.1 < ((pixels > 0) & (pixels < 1)).mean(), "every pixel clamped: the comparison would say little"


@pytest.mark.parametrize("kwargs, message", [
    ({"precision": "int3"}, "precision 'int3' is not available; choose one of"),
    ({"default_scheduler": "plms"}, "default scheduler 'plms': nxc's samplers are ddim, euler, lcm"),
    ({"default_steps": 0}, "default steps 0 and guidance 7.5: expected 1 to 1000 steps and a guidance >= 0"),
    ({"default_guidance": -1.0}, "default steps 50 and guidance -1.0: expected 1 to 1000 steps"),
])
def test_bad_export_options_are_refused_in_one_line(tiny_generator, tmp_path, kwargs, message):
    from nxc.export.generator import export_generator
    from nxc.export.outdir import ExportError
    with pytest.raises(ExportError) as e:
        export_generator(tiny_generator, tmp_path, **kwargs, **QUIET)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "graphs").exists()


def test_chunked_attention_equals_diffusers_attention(tiny_generator):
    """The denoiser graph's attention (query chunks, so no [B*heads, N, N] score tensor exists whole) gives the UNet's
    own output: chunks of 16 rows over the tiny UNet's 64-token self-attention."""
    import torch
    from diffusers import UNet2DConditionModel

    from nxc.export.generator_graphs import DenoiserGraph
    plain = UNet2DConditionModel.from_pretrained(tiny_generator / "unet").eval()
    chunked = DenoiserGraph(UNet2DConditionModel.from_pretrained(tiny_generator / "unet"), chunk=16).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([999.0, 10.0])
    c = torch.randn(2, 77, plain.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        want = plain(x, t, c).sample
        got = chunked(x, t, c)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
