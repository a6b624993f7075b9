import numpy as np
import pytest
import torch
from PIL import Image

from nxc.model import processing as P


@pytest.mark.parametrize("w,h", [(40, 20), (20, 40), (33, 33), (7, 50)])
def test_clip_pixels_white_pad_geometry(w, h):
    img = Image.new("RGB", (w, h), (0, 0, 0))
    side, dx, dy = P.square_offset(w, h)
    x = P.clip_pixels(img, side)  # no resampling at size == side
    white = (1.0 - torch.tensor(P.CLIP_MEAN)) / torch.tensor(P.CLIP_STD)
    black = (0.0 - torch.tensor(P.CLIP_MEAN)) / torch.tensor(P.CLIP_STD)
    assert torch.allclose(x[0, :, dy + h // 2, dx + w // 2], black, atol=1e-5)
    if w != h:
        assert torch.allclose(x[0, :, 0, 0], white, atol=1e-5)
    assert x.shape == (1, 3, side, side)


@pytest.mark.parametrize("w,h", [(200, 100), (100, 200), (64, 64)])
def test_sam_pixels_centre_pad_is_zero(w, h):
    img = Image.new("RGB", (w, h), (255, 0, 0))
    x = P.sam_pixels(img, 128)
    nw, nh = P.sam_resized_size(w, h, 128)
    left, top = (128 - nw) // 2, (128 - nh) // 2
    assert x.shape == (1, 3, 128, 128)
    inside = x[0, :, top + nh // 2, left + nw // 2]
    assert inside[0] > 1.5  # red after normalisation
    if nw < 128:
        assert torch.all(x[0, :, :, 0] == 0) and torch.all(x[0, :, :, -1] == 0)
    if nh < 128:
        assert torch.all(x[0, :, 0, :] == 0) and torch.all(x[0, :, -1, :] == 0)


@pytest.mark.parametrize("w,h", [(300, 120), (120, 300), (90, 90)])
def test_box_round_trip(w, h):
    boxes = np.array([[10, 20, 60, 80], [0, 0, w, h]], np.float32)
    norm = P.normalise_boxes(boxes, w, h)
    assert torch.all((norm >= 0) & (norm <= 1))
    back = P.boxes_to_pixels(norm, w, h).numpy()
    np.testing.assert_allclose(back, boxes, atol=1e-3)


def test_masks_to_image_crops_and_filters():
    w, h = 60, 30
    logits = torch.full((2, 1, 128, 128), -5.0)
    logits[:, :, 60:68, 60:68] = 5.0   # centre blob
    iou = torch.tensor([[0.9], [0.1]])
    m = P.masks_to_image(logits, iou, w, h, iou_threshold=0.3).numpy()
    assert m.shape == (2, h, w) and m.dtype == bool
    assert m[0].any() and m[0, h // 2, w // 2]
    assert not m[1].any()
    m2 = P.masks_to_image(logits, iou, w, h, iou_threshold=None).numpy()
    assert m2[1].any()
