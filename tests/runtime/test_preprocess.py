"""numpy/Pillow pre- and post-processing against the torch reference (nxc.model.processing)."""
import numpy as np
import pytest
import torch
from PIL import Image

from nxc.model import processing as ref
from nxc.model.sam import upsample_mask_logits
from nxc.runtime import preprocess as pp


@pytest.fixture(params=[(80, 50), (50, 80), (64, 64), (1, 300), (300, 7)])
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
