"""The "generate" backend (issue 29): a module call for image generation draws the instruction's text through the
build's text_encoder graph and generator, here the shipped shapes generator (trained for issue 28) behind the
embedded NExT-Chat build. The picture equals the torch reference (the folder's CLIPTextModel, UNet and VAE through
nxc's numpy sampler, nxc.shapes.generator_samples) within one uint8 level, and it draws what it is asked."""
import numpy as np
import pytest
from module_helpers import box_text, say, scene

from nxc.runtime.events import Done, Image, Token

pytest.importorskip("diffusers", reason="the generator's export and its torch reference need the export extra")

GEN = "Sure. <module>A</module><instruction>image generation: a red circle</instruction> Done."


def test_a_generation_call_draws_the_instruction(module_draw_pipe):
    from nxc.assets import nextgpt_checkpoint
    from nxc.shapes.generator_samples import sample_pictures
    s = scene()
    with say(module_draw_pipe, GEN):
        events = list(module_draw_pipe.stream(s.image, "Draw it.", max_new_tokens=80))
    result = events[-1].result
    assert isinstance(events[-1], Done) and result.raw_text == GEN
    pictures = [i for i, e in enumerate(events) if isinstance(e, Image)]
    assert len(pictures) == 1 and result.images == [events[pictures[0]]]
    before = "".join(e.text for e in events[:pictures[0]] if isinstance(e, Token))
    assert before.startswith(GEN[:GEN.index(" Done")]) and len(before) < len(GEN)    # once text follows the call
    call, = result.calls
    assert (call.module, call.backend, call.error, call.images) == ("A", "generate", None, result.images)
    im = result.images[0]
    assert (im.seed, im.steps, im.guidance, im.scheduler) == (0, 20, 4.0, "ddim")
    want = sample_pictures(nextgpt_checkpoint() / "generator", ["a red circle"], steps=20, guidance=4.0, seed=0)
    diff = np.abs(im.pixels.astype(int) - want[0, 0].astype(int))
    assert diff.max() <= 1, diff.max()
    red = (im.pixels[..., 0] > 150) & (im.pixels[..., 1] < 90) & (im.pixels[..., 2] < 90)
    assert red.sum() >= 40, red.sum()                           # a red object is drawn


def test_generation_and_segmentation_in_one_reply(module_draw_pipe):
    s = scene()
    reply = (f"<module>B</module><instruction>segmentation: it</instruction><region>{box_text(s.objects[0].box)}"
             "</region> and <module>A</module><instruction>a blue square</instruction>")
    with say(module_draw_pipe, reply):
        result = module_draw_pipe.chat(s.image, "Both.", max_new_tokens=120)
    assert [(c.module, c.error) for c in result.calls] == [("B", None), ("A", None)]
    assert len(result.detections) == 1 and len(result.images) == 1 and result.images[0].index == 0


def test_a_build_whose_generator_has_no_text_encoder_says_so(drawing_build, tmp_path):
    """A generator without a text encoder (NExT-GPT's: it draws from the projector) cannot serve a generate call:
    the manifest refuses the modules table in one line."""
    import json
    import shutil

    from nxc.manifest import BuildError, load_manifest
    build = tmp_path / "b"
    shutil.copytree(drawing_build[0], build)
    m = json.loads((build / "manifest.json").read_text())
    m["modules"] = {"grammar": "vitron", "region": "pixels", "calls": {"A": {"task": "x", "backend": "generate"}}}
    (build / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BuildError, match="backend 'generate' runs graphs text_encoder"):
        load_manifest(build)


def test_the_text_encoder_entry_round_trips_and_is_checked(module_draw_build, tmp_path):
    import json
    import shutil

    from nxc.manifest import BuildError, load_manifest
    m = load_manifest(module_draw_build)
    g = m.generator
    assert (g.text_encoder, g.tokenizer) == ("text_encoder", "generator_tokenizer")
    assert m.to_dict()["generator"]["tokenizer"] == "generator_tokenizer"
    for edit, message in [
            (lambda d: d["generator"].pop("tokenizer"), "text_encoder and tokenizer come together"),
            (lambda d: d["files"].pop("generator_tokenizer/merges.txt"), "merges.txt not listed under files"),
            (lambda d: d["generator"].update(text_encoder="denoiser"), "are not the generator sizes'")]:
        build = tmp_path / f"b{len(list(tmp_path.iterdir()))}"
        shutil.copytree(module_draw_build, build)
        d = json.loads((build / "manifest.json").read_text())
        edit(d)
        (build / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(BuildError) as e:
            load_manifest(build)
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
