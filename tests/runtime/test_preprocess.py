"""numpy/Pillow pre- and post-processing against the torch reference (nxc.model.processing) and against the
original pad-then-resize, with the memory it takes on extreme aspect ratios."""
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="compares with the torch reference (export extra); a runtime-only "
                            "environment (make test-aarch64) checks preprocessing through the whole answers instead")
from PIL import Image

from nxc.model import processing as ref
from nxc.model.sam import upsample_mask_logits
from nxc.runtime import preprocess as pp


@pytest.fixture(params=[(80, 50), (50, 80), (64, 64), (1, 300), (300, 7), (3000, 20), (20, 3000)])
def image(request):
    w, h = request.param
    return Image.fromarray(np.random.default_rng(w * h).integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_clip_and_sam_pixels_match(image):
    np.testing.assert_allclose(pp.clip_pixels(image, 48), ref.clip_pixels(image, 48).numpy(), atol=1e-5)
    if min(image.size) * 64 / max(image.size) < 0.5:     # the reference cannot resize this thin an image
        assert pp.sam_pixels(image, 64).shape == (1, 3, 64, 64)
        return
    np.testing.assert_allclose(pp.sam_pixels(image, 64), ref.sam_pixels(image, 64).numpy(), atol=1e-4)


def test_boxes_round_trip_and_match(image):
    w, h = image.size
    boxes = np.array([[0, 0, w, h], [w * 0.2, h * 0.3, w * 0.6, h * 0.9]], np.float32)
    np.testing.assert_allclose(pp.normalise_boxes(boxes, w, h), ref.normalise_boxes(boxes, w, h).numpy(), atol=1e-6)
    norm = np.array([[0.1, 0.2, 0.7, 0.9], [-0.1, 0.5, 1.2, 0.6]], np.float32)
    np.testing.assert_allclose(pp.boxes_to_pixels(norm, w, h), ref.boxes_to_pixels(torch.from_numpy(norm), w, h).numpy(),
                               atol=1e-4)


@pytest.mark.parametrize("threshold", [None, 0.3])
def test_masks_match_reference(image, threshold):
    w, h = image.size
    rng = np.random.default_rng(1)
    low = (rng.standard_normal((3, 1, 16, 16)) * 4).astype(np.float32)
    iou = np.array([[0.9], [0.1], [0.5]], np.float32)
    mine = pp.masks_to_image(low, iou, 64, w, h, threshold)
    theirs = ref.masks_to_image(upsample_mask_logits(torch.from_numpy(low), 64), torch.from_numpy(iou), w, h,
                                threshold).numpy()
    assert mine.shape == theirs.shape == (3, h, w)
    for k in range(3):
        inter, union = (mine[k] & theirs[k]).sum(), (mine[k] | theirs[k]).sum()
        assert union == 0 or inter / union >= 0.99


def test_bilinear_matrix_rows_sum_to_one():
    for n_in, n_out in [(16, 64), (64, 16), (7, 7), (1, 5)]:
        np.testing.assert_allclose(pp.bilinear_matrix(n_in, n_out).sum(1), 1.0)


def pad_then_resize(image: Image.Image, size: int, fill: int = 255, resample: str = "bicubic") -> np.ndarray:
    """The oracle: the original order (reference §4.1) and nxc's code before it went square-free: the image pasted
    on the fill-coloured L x L square, then Pillow's resize of the square."""
    side, dx, dy = pp.square_offset(*image.size)
    square = Image.new("RGB", (side, side), (fill,) * 3)
    square.paste(image, (dx, dy))
    return np.asarray(square.resize((size, size), Image.Resampling[resample.upper()]))


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# wide, tall, square, 1-pixel lines, extreme ratios, odd sizes, a side equal to the output, up- and downscaling
SHAPES = [(80, 50), (50, 80), (64, 64), (97, 97), (1, 300), (300, 1), (300, 7), (3000, 20), (20, 3000), (333, 331),
          (331, 333), (17, 1001), (1001, 17), (336, 200), (200, 336), (5, 3), (2, 7), (641, 480)]


@pytest.mark.parametrize("w,h", SHAPES)
def test_square_free_resize_equals_pad_then_resize(w, h):
    """Bit for bit, every Pillow filter clip_pixels accepts, downscaling and upscaling, white and black padding."""
    image = noise(w, h, seed=w * 7919 + h)
    for size in (336, 97, 64):
        for resample in pp.PADDED_RESAMPLE:
            np.testing.assert_array_equal(pp.square_resize(image, size, 255, resample),
                                          pad_then_resize(image, size, 255, resample), err_msg=f"{size} {resample}")
    np.testing.assert_array_equal(pp.square_resize(image, 48, 0), pad_then_resize(image, 48, 0))


@pytest.mark.parametrize("w,h", [(3000, 20), (20, 3000), (1, 300), (641, 480), (333, 1000)])
def test_clip_pixels_after_normalisation_equal_the_oracle(w, h):
    image = noise(w, h)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    old = pad_then_resize(image, 336, resample="bilinear").astype(np.float32) / 255.0
    old = (old - np.float32(mean)) / np.float32(std)
    new = pp.clip_pixels(image, 336, mean=mean, std=std, resample="bilinear")
    assert np.abs(new[0].transpose(1, 2, 0) - old).max() == 0.0


@pytest.mark.parametrize("name,allowed", [("nearest", pp.PADDED_RESAMPLE), ("bicubicc", pp.RESAMPLE)])
def test_unknown_resample_is_refused(name, allowed):
    with pytest.raises(ValueError, match=f"resample '{name}' is not supported here; expected one of"):
        pp.resample_filter(name, allowed)


def test_sam_pixels_honour_resample():
    image = noise(300, 200)
    a, b = pp.sam_pixels(image, 64, resample="bilinear"), pp.sam_pixels(image, 64, resample="nearest")
    assert a.shape == b.shape and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, pp.sam_pixels(image, 64))


EXTREME = [(1, 100000), (100000, 1), (40000, 100), (100, 40000)]


def _peak(f) -> int:
    tracemalloc.start()
    try:
        f()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("w,h", EXTREME)
def test_preprocessing_allocates_a_small_multiple_of_its_output(w, h):
    """numpy's allocations (tracemalloc): within 4x the output; the padded square would be 40 GB / 6.4 GB."""
    image = Image.new("RGB", (w, h), (20, 120, 220))
    assert _peak(lambda: pp.clip_pixels(image, 336)) <= 4 * (3 * 336 * 336 * 4)
    assert _peak(lambda: pp.sam_pixels(image, 1024)) <= 4 * (3 * 1024 * 1024 * 4)
    low, iou = np.zeros((3, 1, 256, 256), np.float32), np.ones((3, 1), np.float32)
    # masks: 4x the [K,H,W] output plus the fixed [S, 256] resize matrices and blocks
    assert _peak(lambda: pp.masks_to_image(low, iou, 1024, w, h)) <= 4 * (3 * w * h) + (16 << 20)


def test_peak_memory_of_extreme_images_in_a_fresh_process():
    """Pillow's own buffers too (tracemalloc does not see them): the process's peak RSS grows by < 200 MB."""
    code = (
        "import resource, numpy as np\n"
        "from PIL import Image\n"
        "from nxc.runtime import preprocess as pp\n"
        "images = [Image.new('RGB', s, (20, 120, 220)) for s in ((1, 100000), (40000, 100))]\n"
        "low, iou = np.zeros((2, 1, 256, 256), np.float32), np.ones((2, 1), np.float32)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for im in images:\n"
        "    pp.clip_pixels(im, 336); pp.sam_pixels(im, 1024); pp.masks_to_image(low, iou, 1024, *im.size)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)\n")
    grown_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 200, f"peak RSS grew by {grown_mb} MB"


def _rec_scene(seed, w, h):
    """A shapes scene stretched to w x h and a grounding question the embedded model answers with a box."""
    from nxc.shapes.data import make_sample, make_scene
    rng = np.random.default_rng(seed)
    scene = make_scene(rng)
    return scene.image.resize((w, h), Image.BICUBIC), make_sample(rng, "rec", scene).question


@pytest.mark.parametrize("w,h", [(1, 100000), (40000, 100)])
def test_extreme_images_go_through_the_pipeline(embedded_pipe, w, h):
    """Pipeline.chat end to end (CLIP and SAM preprocessing, a box, its mask on the original image)."""
    image, question = _rec_scene(0, w, h)
    r = embedded_pipe.chat(image, question, max_new_tokens=24)
    assert r.finish_reason == "stop" and r.detections, r.text
    for d in r.detections:
        assert d.mask.shape == (h, w) and np.all(np.isfinite(d.box))


@pytest.mark.parametrize("w,h", [(3000, 20), (20, 3000), (999, 101)])
def test_extreme_aspect_ratios_match_the_reference(embedded_pipe, embedded_ref, w, h):
    """The reference still pads then resizes (the definition); the runtime's square-free pixels give the same ids,
    boxes and masks."""
    image, question = _rec_scene(0, w, h)
    r = embedded_pipe.chat(image, question, max_new_tokens=24)
    ref = embedded_ref.chat(image, question, max_new_tokens=24)
    assert r.token_ids == ref.token_ids and len(r.detections) == len(ref.detections) > 0, r.text
    for a, b in zip(r.detections, ref.detections):
        np.testing.assert_allclose(a.box_norm, b.box_norm, atol=1e-3)
        assert (a.mask == b.mask).mean() >= 0.99
