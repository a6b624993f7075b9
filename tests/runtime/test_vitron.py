"""The shipped VITRON-style model (embedded:shapes-vitron, issue 29): exported with its module table and GLIGEN
generator, it answers pixel-level requests with module calls that the runtime runs: the runtime's tokens equal the
PyTorch reference's, a segmentation call's mask covers the object, an edit and a grounded drawing make pictures, and a
track request becomes a track call."""
import numpy as np
import pytest

from nxc.shapes.data import make_scene

pytest.importorskip("diffusers", reason="the build's generator is exported with the export extra")


def scene():
    return make_scene(np.random.default_rng(11), max_objects=3)


def test_the_build_carries_the_module_table_and_a_gligen_generator(shapes_vitron_pipe):
    from nxc.shapes.module_tasks import MODULES
    m = shapes_vitron_pipe.manifest
    assert {k: e.backend for k, e in m.modules.calls.items()} == {k: v["backend"] for k, v in MODULES["calls"].items()}
    assert m.generator.sizes.grounded and m.generator.encoder == "latent_encoder"


def test_runtime_tokens_equal_the_reference_on_module_requests(shapes_vitron_pipe):
    from nxc.assets import vitron_checkpoint
    from nxc.model.reference import ReferenceChat
    ref = ReferenceChat.load(vitron_checkpoint())
    s = scene()
    o = s.objects[0]
    for q, boxes in ((f"Segment the {o.phrase}.", None), (f"Replace the {o.phrase} with a yellow star.", None),
                     ("Draw a red star in [0].", [[4, 4, 40, 40]])):
        want = ref.chat(s.image, q, boxes=boxes, max_new_tokens=96)
        got = shapes_vitron_pipe.chat(s.image, q, boxes=boxes, max_new_tokens=96)
        assert got.token_ids == want.token_ids, q


def test_a_segmentation_request_becomes_a_call_whose_mask_covers_the_object(shapes_vitron_pipe):
    s = scene()
    o = s.objects[0]
    r = shapes_vitron_pipe.chat(s.image, f"Segment the {o.phrase}.", max_new_tokens=96)
    call, = r.calls
    assert (call.module, call.backend, call.error) == ("B", "segment", None), r.raw_text
    inter = np.logical_and(call.detection.mask, o.mask).sum()
    assert inter / np.logical_or(call.detection.mask, o.mask).sum() > 0.5


def test_an_edit_and_a_grounded_drawing_make_pictures(shapes_vitron_pipe):
    s = scene()
    o = s.objects[0]
    r = shapes_vitron_pipe.chat(s.image, f"Replace the {o.phrase} with a yellow star.", max_new_tokens=96)
    assert [(c.module, c.error) for c in r.calls] == [("C", None)] and len(r.images) == 1
    r = shapes_vitron_pipe.chat(s.image, "Draw a red star in [0].", boxes=[[4, 4, 40, 40]], max_new_tokens=96)
    call, = r.calls
    assert (call.module, call.error, call.call.region_ref) == ("A", None, 0) and len(r.images) == 1


def test_a_track_request_becomes_a_track_call(shapes_vitron_pipe):
    """Asked on a clip's first frame (the model learned the requests on images; on a whole clip its image rows are the
    frames' average, which it never saw in training, and some replies garble: nxc-eval's tracking score counts them)."""
    from nxc.shapes.clips import make_clip
    clip = make_clip(np.random.default_rng(5), frames=6, max_objects=1)
    colour, shape = clip.objects[0]
    r = shapes_vitron_pipe.chat(clip.frames[0], f"Track the {colour} {shape}.", max_new_tokens=96)
    call, = r.calls
    assert (call.module, call.backend, call.error) == ("E", "track", None), r.raw_text
    assert len(call.track) == 1
    inter = np.logical_and(call.track[0].mask, clip.masks[0, 0]).sum()
    assert inter / np.logical_or(call.track[0].mask, clip.masks[0, 0]).sum() > 0.5
