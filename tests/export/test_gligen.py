"""GLIGEN grounded generation and inpainting (issue 29): a UNet2DConditionModel(attention_type="gated") exported with
its grounding inputs, its VAE encoder and its text encoder's pooled output, run by the runtime's Generator (numpy
sampler, ONNX Runtime graphs) and compared with diffusers' StableDiffusionGLIGENPipeline on the same weights, the
same initial latents and, for inpainting, the same noise draws (the pipeline's own torch draws are replaced by the
runtime's, in the order it makes them)."""
import numpy as np
import pytest
from gligen_helpers import GUIDANCE, STEPS, as_float, pipeline_picture, reference_pipeline, replay_draws, runtime_generator

from nxc import names

pytest.importorskip("diffusers", reason="GLIGEN's export and its reference pipeline need the export extra")

QUIET = {"log": lambda _m: None}
PHRASES, BOXES = ["a red circle", "a blue square"], [[0.1, 0.1, 0.5, 0.6], [0.5, 0.25, 0.875, 0.875]]


@pytest.fixture(scope="module")
def gligen(tmp_path_factory):
    """(folder, out, GeneratorExport) of a tiny GLIGEN generator (gates set away from 0) exported fp32."""
    from nxc.export.generator import export_generator
    from nxc.model.generator import make_tiny_generator
    root = tmp_path_factory.mktemp("gligen")
    folder = make_tiny_generator(root / "gen", seed=5, gated=True)
    return folder, root / "out", export_generator(folder, root / "out", default_steps=STEPS,
                                                  default_guidance=GUIDANCE, **QUIET)


@pytest.fixture(scope="module")
def gligen_inpainting(tmp_path_factory):
    """The same for GLIGEN's inpainting UNet (9 input channels)."""
    from nxc.export.generator import export_generator
    from nxc.model.generator import make_tiny_generator
    root = tmp_path_factory.mktemp("gligen-inpaint")
    folder = make_tiny_generator(root / "gen", seed=6, gated=True, inpainting=True)
    return folder, root / "out", export_generator(folder, root / "out", default_steps=STEPS,
                                                  default_guidance=GUIDANCE, **QUIET)


def test_a_gligen_generator_exports_its_grounding_inputs_encoder_and_phrase_pooling(gligen):
    from nxc.specs import generator_specs
    _, out, result = gligen
    e = result.entry
    assert e["sizes"]["grounding_objects"] == 30 and e["sizes"]["phrase_dim"] == 32
    assert (e["encoder"], e["grounding_beta"], e["text_encoder"]) == ("latent_encoder", 0.3, "text_encoder")
    specs = generator_specs(__import__("nxc.config", fromlist=["GeneratorSizes"]).GeneratorSizes.from_dict(e["sizes"]))
    assert [t.name for t in specs["denoiser"].inputs] == ["sample", "timestep", "encoder_hidden_states", "boxes",
                                                           "phrase_embeddings", "object_mask", "grounding"]
    assert set(result.graphs) == {*names.GENERATOR_GRAPHS, names.GRAPH_TEXT_ENCODER} == set(result.parity)
    for g, report in result.parity.items():
        assert report["ok"], (g, report)
        assert all(o["max_abs"] < 1e-4 for c in report["checks"] for o in c["outputs"].values()), (g, report)
    assert [o["name"] for o in result.graphs["text_encoder"]["outputs"]] == ["conditioning", "pooled"]


def test_each_fuser_runs_inside_an_if_on_the_grounding_switch(gligen):
    """Scheduled sampling costs nothing after beta: every fuser's nodes are the then-branch of an If on
    max(grounding) > 0 (nxc.export.gligen_graph), none is left in the main graph."""
    import onnx
    from diffusers.models.attention import GatedSelfAttentionDense

    from nxc.model.generator import load_generator
    folder, out, result = gligen
    fusers = sum(type(m) is GatedSelfAttentionDense for m in load_generator(folder)[0].modules())
    g = onnx.load(str(out / result.graphs["denoiser"]["file"])).graph
    ifs = [n for n in g.node if n.op_type == "If"]
    assert fusers >= 2 and len(ifs) == fusers
    assert not [n.name for n in g.node if "/fuser/" in n.name and n.op_type != "If"]
    assert all(len(n.attribute[0].g.node) > 20 for n in ifs if n.attribute[0].name == "then_branch")


def test_grounded_generation_equals_the_gligen_pipeline(gligen):
    """Two phrases in two boxes, 10 DDIM steps, grounding for the first 3 (scheduled sampling), guidance 7.5: the
    runtime's picture equals StableDiffusionGLIGENPipeline's within one uint8 level; without the boxes it is another
    picture (the grounding inputs are used)."""
    from nxc.runtime.generator import DrawOptions
    folder, out, result = gligen
    gen = runtime_generator(out, result)
    cond = gen.text_conditioning("two shapes")
    got, o = gen.draw(cond, DrawOptions(seed=3), grounding=(PHRASES, BOXES))
    assert (o.steps, o.guidance, o.scheduler) == (STEPS, GUIDANCE, "ddim")
    from nxc.diffusion import initial_latents
    latents = initial_latents((1, 4, 8, 8), 3)
    want = pipeline_picture(reference_pipeline(folder), "two shapes", latents, gligen_phrases=PHRASES,
                            gligen_boxes=BOXES)
    assert got.shape == want.shape == (16, 16, 3)
    assert np.abs(as_float(got) - want).max() <= 1 / 255 + 1e-6
    plain, _ = gen.draw(cond, DrawOptions(seed=3))
    assert np.abs(plain.astype(int) - got.astype(int)).max() > 8, "the boxes changed nothing"


def test_the_fuser_switch_is_the_pipelines_enable_fuser(gligen):
    """grounding = 0 in the graph gives the UNet with its fusers disabled (diffusers' enable_fuser(False)), and
    grounding = 1 the enabled ones, at batch 2."""
    import onnxruntime as ort
    import torch

    from nxc.model.generator import load_generator
    folder, out, result = gligen
    unet = load_generator(folder)[0]
    sess = ort.InferenceSession(str(out / result.graphs["denoiser"]["file"]), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32),
             "timestep": np.array([700, 700], np.float32),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32),
             "boxes": np.tile(np.array([[0.1, 0.2, 0.6, 0.9]] * 30, np.float32), (2, 1, 1)),
             "phrase_embeddings": rng.standard_normal((2, 30, 32), dtype=np.float32),
             "object_mask": np.tile((np.arange(30) < 2).astype(np.float32), (2, 1))}
    gligen_kwargs = {k: torch.from_numpy(feeds[v]) for k, v in
                     (("boxes", "boxes"), ("positive_embeddings", "phrase_embeddings"), ("masks", "object_mask"))}
    from diffusers.models.attention import GatedSelfAttentionDense
    outs = []
    for on in (1.0, 0.0):
        for m in unet.modules():
            if type(m) is GatedSelfAttentionDense:
                m.enabled = bool(on)
        with torch.no_grad():
            want = unet(torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                        torch.from_numpy(feeds["encoder_hidden_states"]),
                        cross_attention_kwargs={"gligen": dict(gligen_kwargs)}).sample.numpy()
        got = sess.run(None, {**feeds, "grounding": np.full(2, on, np.float32)})[0]
        assert np.abs(got - want).max() < 1e-4, (on, np.abs(got - want).max())
        outs.append(got)
    assert np.abs(outs[0] - outs[1]).max() > 1e-2, "the gated attention does nothing: the test would say little"


def _source():
    """A 16 x 16 picture: a green field with a yellow block."""
    px = np.zeros((16, 16, 3), np.uint8)
    px[..., 1] = 160
    px[2:7, 9:14] = (230, 220, 30)
    return px


@pytest.mark.parametrize("which", ["gligen", "gligen_inpainting"])
def test_inpainting_equals_the_gligen_pipeline(which, request, monkeypatch):
    """GLIGEN's inpainting of one phrase into one box of a picture, with the inpainting UNet (blend + [masked source
    latents, mask] channels) and with the generation UNet (the blend alone: the pipeline always appends the mask
    channels, so its UNet is given them and drops them): equal to the pipeline within one uint8 level, given the
    same draws."""
    from PIL import Image

    from nxc.diffusion import initial_latents
    from nxc.runtime.generator import DrawOptions
    folder, out, result = request.getfixturevalue(which)
    gen = runtime_generator(out, result)
    box = [[0.25, 0.25, 0.75, 0.75]]
    cond = gen.text_conditioning("a ball on grass")
    got, _ = gen.draw(cond, DrawOptions(seed=4), grounding=(["a red ball"], box), source=_source())
    replay_draws(monkeypatch, 4, (1, 4, 8, 8))
    want = pipeline_picture(reference_pipeline(folder), "a ball on grass", initial_latents((1, 4, 8, 8), 4),
                            gligen_phrases=["a red ball"], gligen_boxes=box,
                            gligen_inpaint_image=Image.fromarray(_source()))
    assert np.abs(as_float(got) - want).max() <= 1 / 255 + 1e-6
    if which == "gligen":           # the inpainting UNet needs a source; the generation UNet draws without one
        plain, _ = gen.draw(cond, DrawOptions(seed=4), grounding=(["a red ball"], box))
        assert np.abs(plain.astype(int) - got.astype(int)).max() > 8, "the source picture changed nothing"
    latents = [gen.source_latents(px, np.random.default_rng(0)) for px in (_source(), 255 - _source())]
    assert np.abs(latents[0] - latents[1]).max() > 0.05, "the encoder does not see the picture"


def test_the_inpainting_mask_is_cut_as_the_pipelines(gligen):
    import torch

    from nxc.runtime.generator import outside_boxes
    pipe = reference_pipeline(gligen[0])
    for boxes in ([[0.1, 0.1, 0.5, 0.6]], [[0.0, 0.3, 0.7, 1.0], [0.55, 0.05, 0.95, 0.45]], [[0.26, 0.26, 0.74, 0.74]]):
        want = pipe.draw_inpaint_mask_from_boxes(boxes, (8, 8))
        assert np.array_equal(outside_boxes(boxes, 8, 8), want.numpy()), boxes
        assert isinstance(want, torch.Tensor)


def test_phrase_embeddings_are_the_pipelines_pooled_ones(gligen):
    """The text_encoder graph's pooled output on ids padded to 77 equals the pipeline's
    text_encoder(**tokenizer(phrases, padding=True)).pooler_output (padded to the longest phrase, with a mask)."""
    import torch
    folder, out, result = gligen
    gen = runtime_generator(out, result)
    pipe = reference_pipeline(folder)
    phrases = ["a red circle", "a very small blue square at the top", "x"]
    with torch.no_grad():
        want = pipe.text_encoder(**pipe.tokenizer(phrases, padding=True, return_tensors="pt")).pooler_output.numpy()
    got = gen.phrase_embeddings(phrases)
    assert got.shape == want.shape == (3, 32) and np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("grounding, message", [
    ((["a"], [[0.5, 0.5, 0.2, 0.9]]), "grounding boxes are xyxy fractions of the picture"),
    ((["a"], [[0.1, 0.1, 1.5, 0.9]]), "grounding boxes are xyxy fractions of the picture"),
    ((["a", "b"], [[0.1, 0.1, 0.5, 0.9]]), "grounding takes one box per phrase, got 2 phrases and 1 boxes"),
    ((["a"] * 31, [[0.1, 0.1, 0.5, 0.9]] * 31), "at most 30 grounded objects per picture"),
])
def test_bad_grounding_is_refused_in_one_line(gligen, grounding, message):
    from nxc.runtime.generator import DrawOptions
    gen = runtime_generator(gligen[1], gligen[2])
    with pytest.raises(ValueError) as e:
        gen.draw(gen.text_conditioning("x"), DrawOptions(steps=2), grounding=grounding)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_an_inpainting_unet_needs_a_picture_and_a_plain_generator_refuses_grounding(gligen_inpainting,
                                                                                     tiny_generator_fp32):
    from nxc.manifest import BuildError
    from nxc.runtime.generator import DrawOptions
    gen = runtime_generator(gligen_inpainting[1], gligen_inpainting[2])
    with pytest.raises(ValueError, match="GLIGEN's inpainting model: it draws into a picture"):
        gen.draw(gen.text_conditioning("x"), DrawOptions(steps=2), grounding=(["a"], [[0.1, 0.1, 0.5, 0.5]]))
    with pytest.raises(ValueError, match=r"the picture to edit must be uint8 \[16, 16, 3\]"):
        gen.draw(gen.text_conditioning("x"), DrawOptions(steps=2), grounding=(["a"], [[0.1, 0.1, 0.5, 0.5]]),
                 source=np.zeros((8, 8, 3), np.uint8))
    plain = runtime_generator(*tiny_generator_fp32)
    cond = np.zeros((1, 77, 32), np.float32)
    with pytest.raises(BuildError, match="not GLIGEN's"):
        plain.draw(cond, DrawOptions(steps=2), grounding=(["a"], [[0.1, 0.1, 0.5, 0.5]]))


def test_fp16_and_int8_gligen_builds_stay_close(gligen, tmp_path):
    from nxc.export.generator import KEPT_ENCODER_FP32, export_generator
    folder = gligen[0]
    for precision in ("fp16", "int8"):
        result = export_generator(folder, tmp_path / precision, precision=precision, **QUIET)
        assert result.graphs["latent_encoder"]["precision"] == "fp32"
        assert result.graphs["latent_encoder"]["fp32_reason"] == KEPT_ENCODER_FP32
        noise = result.accuracy["graphs"]["denoiser"]["noise"]
        assert noise["cosine"] > 0.999, (precision, noise)
        assert all(r["ok"] for r in result.parity.values())


def test_other_attention_types_are_refused_in_one_line(tmp_path):
    import json

    from nxc.model.generator import GeneratorError, inspect_generator, make_tiny_generator
    folder = make_tiny_generator(tmp_path / "g", seed=0, gated=True)
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**cfg, "attention_type": "gated-text-image"}))
    with pytest.raises(GeneratorError, match="'gated-text-image' .image-grounded GLIGEN. is not supported"):
        inspect_generator(folder)
