"""A head of signal tokens through the manifest alone (issue 28): the embedded NExT-Chat build given four of its
vocabulary's pieces as signal tokens, NExT-GPT's output projector and a tiny diffusers generator, all exported by
nxc's own exporters. The runtime's picture equals the torch reference's (the projector module, then diffusers'
UNet / VAE and diffusers' own DDIM scheduler on the same latents) within 1e-3."""
import numpy as np
import pytest

from drawing_helpers import say_signal_at
from nxc.runtime.events import Done, Image, Token

pytest.importorskip("diffusers", reason="the generator's export and reference need the export extra (diffusers)")
torch = pytest.importorskip("torch", reason="the projector's export needs the export extra (torch)")

QUESTION = "Can you describe the image and include object locations?"


def test_a_reply_that_says_the_signal_tokens_makes_a_picture(drawing_pipe, embedded_pipe):
    from nxc.shapes.data import make_scene
    scene = make_scene(np.random.default_rng(3), max_objects=3)
    with say_signal_at(drawing_pipe, 2):
        events = list(drawing_pipe.stream(scene.image, QUESTION, max_new_tokens=24,
                                          head_options={"signal": {"steps": 4, "seed": 5}}))
    result = events[-1].result
    signals = drawing_pipe.dispatch.head_of_kind("signal").signals
    ids = result.token_ids
    k = ids.index(signals[0])
    assert ids[k:k + 4] == signals and len(ids) > k + 4, ids       # emitted after the first; then the reply goes on
    pictures = [e for e in events if isinstance(e, Image)]
    assert len(pictures) == 1 and result.images == pictures and isinstance(events[-1], Done)
    assert events.index(pictures[0]) > max(i for i, e in enumerate(events) if isinstance(e, Token))
    im = pictures[0]
    s = drawing_pipe.manifest.generator.sizes
    assert im.pixels.shape == (s.image_height, s.image_width, 3) and im.pixels.dtype == np.uint8
    assert (im.seed, im.steps, im.scheduler) == (5, 4, "ddim") and im.guidance == 3.0
    assert all(not hasattr(d, "k") for d in result.detections)     # signal hiddens are not detections
    group = drawing_pipe.tokenizer.decode(list(signals)).strip()
    assert group in result.raw_text and group not in result.text     # shown without the signal tokens


def test_no_signal_no_picture_and_the_reply_equals_the_build_without_a_generator(drawing_pipe, embedded_pipe):
    from nxc.shapes.data import make_scene
    scene = make_scene(np.random.default_rng(4), max_objects=3)
    want = embedded_pipe.chat(scene.image, QUESTION)
    got = drawing_pipe.chat(scene.image, QUESTION)
    assert got.token_ids == want.token_ids and got.images == []


def test_the_picture_equals_the_torch_reference(drawing_build, drawing_pipe):
    """The same hiddens: projector (torch) -> diffusers' UNet with diffusers' DDIMScheduler on nxc's initial latents
    -> the VAE, against the runtime's projector graph, numpy sampler and graphs: 20 steps, guidance 3."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from nxc.diffusion import initial_latents
    from nxc.runtime.generator import DrawOptions
    build, signals, projector, folder = drawing_build
    pipe = drawing_pipe
    h = pipe.config.llm.hidden_size
    hiddens = np.random.default_rng(0).standard_normal((1, 4, h)).astype(np.float32)
    embeds = np.asarray(pipe.embeddings[[pipe.manifest.token_id(t) for t in signals]], np.float32)[None]
    kind = pipe.dispatch.head_of_kind("signal").kind
    cond = kind.bound.run({"hidden": hiddens, "signal_embeds": embeds})["conditioning"]
    pixels, used = kind.generator().draw(cond, DrawOptions(steps=20, guidance=3.0, seed=11))

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    sched = DDIMScheduler.from_pretrained(folder / "scheduler")
    s = pipe.manifest.generator.sizes
    with torch.no_grad():
        c = projector(torch.from_numpy(hiddens), torch.from_numpy(embeds))
        np.testing.assert_allclose(cond, c.numpy(), atol=1e-4)
        u = torch.from_numpy(np.load(build / "uncond.npy"))
        both = torch.cat([u, c])
        x = torch.from_numpy(initial_latents((1, s.latent_channels, s.latent_height, s.latent_width), 11))
        sched.set_timesteps(20)
        x = x * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eu, ec = unet(inp, t, encoder_hidden_states=both).sample.chunk(2)
            x = sched.step(eu + 3.0 * (ec - eu), t, x).prev_sample
        img = (vae.decode(x / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    want = img[0].permute(1, 2, 0).numpy()
    got = pixels.astype(np.float32) / 255
    assert np.abs(got - want).max() <= 1e-3 + 0.5 / 255        # the runtime's uint8 rounding on top of 1e-3
    assert used.steps == 20 and used.scheduler == "ddim"


@pytest.mark.parametrize("options, message", [
    ({"steps": 0}, "steps must be a whole number >= 1"),
    ({"guidance": -1}, "guidance must be a finite number >= 0"),
    ({"scheduler": "pndm"}, "unknown scheduler 'pndm'"),
    ({"sizes": 3}, "picture options are steps, guidance, seed and scheduler"),
])
def test_bad_picture_options_are_one_line(drawing_pipe, options, message):
    from nxc.shapes.data import make_scene
    with pytest.raises(ValueError, match=message) as e:
        drawing_pipe.chat(make_scene(np.random.default_rng(1), max_objects=1).image, QUESTION,
                          head_options={"signal": options})
    assert "\n" not in str(e.value)


def test_a_build_without_a_generator_refuses_picture_options(embedded_pipe):
    from nxc.shapes.data import make_scene
    with pytest.raises(ValueError, match="head_options names 'signal', but this build's heads are box"):
        embedded_pipe.chat(make_scene(np.random.default_rng(1), max_objects=1).image, QUESTION,
                           head_options={"signal": {"steps": 4}})


def test_a_build_without_a_generator_asked_to_draw_answers_in_text(embedded_pipe):
    from nxc.shapes.data import make_scene
    r = embedded_pipe.chat(make_scene(np.random.default_rng(2), max_objects=1).image, "Draw a red circle.")
    assert r.text and r.images == [] and r.finish_reason in ("stop", "length")


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: expects a whole number >= 1, got '0'"),
    (["--guidance", "-1"], "--guidance: expects a finite number >= 0, got '-1'"),
    (["--scheduler", "pndm"], "--scheduler: invalid choice: 'pndm'"),
])
def test_nxc_run_refuses_bad_picture_flags_in_one_line(drawing_build, tmp_path, capsys, args, message):
    from nxc.runtime.cli import main
    from nxc.shapes.data import make_scene
    image = tmp_path / "in.png"
    make_scene(np.random.default_rng(1), max_objects=1).image.save(image)
    with pytest.raises(SystemExit):
        main([str(drawing_build[0]), "--image", str(image), "--prompt", "Draw a red circle.", *args])
    assert message in capsys.readouterr().err


def test_nxc_run_on_a_build_that_does_not_draw_refuses_picture_flags(embedded_build, tmp_path, capsys):
    from nxc.runtime.cli import main
    from nxc.shapes.data import make_scene
    image = tmp_path / "in.png"
    make_scene(np.random.default_rng(1), max_objects=1).image.save(image)
    assert main([str(embedded_build), "--image", str(image), "--prompt", "Draw a red circle.", "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not draw" in err[0], err


def test_nxc_run_writes_the_picture_it_was_asked_for(drawing_build, drawing_pipe, tmp_path, capsys, monkeypatch):
    """nxc-run on a drawing build: the reply's picture to --out, byte-equal to the runtime's pixels."""
    from PIL import Image as PILImage

    from drawing_helpers import say_signal_at
    from nxc.runtime import cli
    from nxc.shapes.data import make_scene
    image = tmp_path / "in.png"
    make_scene(np.random.default_rng(1), max_objects=1).image.save(image)
    monkeypatch.setattr("nxc.runtime.pipeline.Pipeline.load", classmethod(lambda cls, *a, **k: drawing_pipe))
    with say_signal_at(drawing_pipe, 2):
        assert cli.main([str(drawing_build[0]), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens",
                         "12", "--steps", "3", "--seed", "2", "--out", str(tmp_path / "pic.png")]) == 0
    out = capsys.readouterr().out
    assert "picture 0:" in out and "seed 2, 3 ddim steps" in out
    with say_signal_at(drawing_pipe, 2):
        want = drawing_pipe.chat(PILImage.open(image), QUESTION, max_new_tokens=12,
                                 head_options={"signal": {"steps": 3, "seed": 2}}).images[0].pixels
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "pic.png").convert("RGB")), want)


def test_nxc_run_needs_no_image_for_a_build_that_draws(drawing_build, drawing_pipe, embedded_build, tmp_path, capsys,
                                                       monkeypatch):
    """Without --image a build that draws takes the blank picture (nxc.runtime.images.blank_image); one that
    answers about images says --image is required, in one line."""
    from PIL import Image as PILImage

    from drawing_helpers import say_signal_at
    from nxc.runtime import cli
    from nxc.runtime.images import blank_image
    assert cli.main([str(embedded_build), "--prompt", "Where is the red circle?"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nxc-run: --image is required") and err.count("\n") == 1
    monkeypatch.setattr("nxc.runtime.pipeline.Pipeline.load", classmethod(lambda cls, *a, **k: drawing_pipe))
    with say_signal_at(drawing_pipe, 2):
        assert cli.main([str(drawing_build[0]), "--prompt", QUESTION, "--max-new-tokens", "12", "--steps", "3",
                         "--out", str(tmp_path / "pic.png")]) == 0
        want = drawing_pipe.chat(blank_image(), QUESTION, max_new_tokens=12,
                                 head_options={"signal": {"steps": 3, "seed": 0}}).images[0].pixels
    np.testing.assert_array_equal(np.asarray(PILImage.open(tmp_path / "pic.png").convert("RGB")), want)
