"""Grounded generation and editing through module calls (issue 29): a reply's `<module>A</module>` with a region
draws its instruction in that box, and `<module>C</module>` with a region redraws that part of the conversation's
image, on a build with a (tiny, random) GLIGEN generator. Each picture equals diffusers' StableDiffusionGLIGENPipeline
on the same folder, given what the call says (the box mapped by hand here, the image as the user gave it: the
pipeline crops and resizes it itself), the same initial latents and the same draws."""
import numpy as np
import pytest
from gligen_helpers import as_float, pipeline_picture, reference_pipeline, replay_draws
from module_helpers import say, scene

from nxc.runtime.events import Image

pytest.importorskip("diffusers", reason="the GLIGEN export and its reference pipeline need the export extra")


@pytest.fixture(scope="module")
def gligen_pipe(gligen_module_build):
    from nxc.runtime.pipeline import Pipeline
    return Pipeline.load(gligen_module_build[0])


def wide_image():
    """The scene's picture cut to 3:2 (so the editing crop is exercised)."""
    im = scene().image
    w, h = im.size
    return im.crop((0, 0, w, h * 2 // 3))


def test_an_edit_call_inpaints_its_region_as_the_gligen_pipeline_does(gligen_pipe, gligen_module_build,
                                                                      monkeypatch):
    from nxc.diffusion import initial_latents
    image = wide_image()
    w, h = image.size
    region = [w // 2 - h // 4, h // 4, w // 2 + h // 4, h * 3 // 4]          # the middle of the centred square
    reply = f"Done: <module>C</module><instruction>editing: a red ball</instruction><region>{region}</region>"
    with say(gligen_pipe, reply.replace(", ", ",")):
        events = list(gligen_pipe.stream(image, "Make it a red ball.", max_new_tokens=120))
    result = events[-1].result
    call, = result.calls
    assert (call.module, call.backend, call.error, call.note) == ("C", "edit", None, None), call.error
    assert [e for e in events if isinstance(e, Image)] == result.images == call.images
    left = (w - h) / 2                                                          # the centred h x h square
    box = [(region[0] - left) / h, region[1] / h, (region[2] - left) / h, region[3] / h]
    replay_draws(monkeypatch, 0, (1, 4, 8, 8))
    want = pipeline_picture(reference_pipeline(gligen_module_build[1]), "a red ball", initial_latents((1, 4, 8, 8), 0),
                            gligen_phrases=["a red ball"], gligen_boxes=[box], gligen_inpaint_image=image)
    assert np.abs(as_float(result.images[0].pixels) - want).max() <= 1 / 255 + 1e-6


def test_a_generation_call_with_a_region_is_grounded_in_it(gligen_pipe, gligen_module_build):
    """The region is read in the frame of the picture being drawn (16 x 16 pixels here)."""
    from nxc.diffusion import initial_latents
    reply = "<module>A</module><instruction>a blue square</instruction><region>[2,4,10,14]</region>"
    with say(gligen_pipe, reply):
        result = gligen_pipe.chat(scene().image, "Draw.", max_new_tokens=120)
    call, = result.calls
    assert (call.backend, call.error, call.note) == ("generate", None, None)
    want = pipeline_picture(reference_pipeline(gligen_module_build[1]), "a blue square",
                            initial_latents((1, 4, 8, 8), 0), gligen_phrases=["a blue square"],
                            gligen_boxes=[[2 / 16, 4 / 16, 10 / 16, 14 / 16]])
    assert np.abs(as_float(result.images[0].pixels) - want).max() <= 1 / 255 + 1e-6


@pytest.mark.parametrize("reply, error", [
    ("<module>C</module><instruction>editing: a red ball</instruction>", "needs a <region> to edit here"),
    ("<module>C</module><instruction>a red ball</instruction><region>[0,0,900,10]</region>", "is outside the"),
    ("<module>A</module><instruction>a red ball</instruction><region>[0,0,17,10]</region>",
     "is outside the 16 x 16 picture being drawn"),
    ("<module>A</module><instruction>a red ball</instruction><region>[5,5,5,10]</region>",
     "a region needs x2 > x1 and y2 > y1"),
])
def test_calls_that_cannot_be_drawn_stay_text_with_the_reason(gligen_pipe, reply, error):
    with say(gligen_pipe, reply):
        result = gligen_pipe.chat(scene().image, "Go.", max_new_tokens=120)
    call, = result.calls
    assert call.images == [] and error in call.error, call.error
    assert result.raw_text == reply
