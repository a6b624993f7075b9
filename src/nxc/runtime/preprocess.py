"""Pre- and post-processing (reference §4, §5.4) in numpy and Pillow: the same numbers as nxc.model.processing.

Frames:
- "square": the image pasted on a white L x L square, L = max(W, H), centred on the short side. Normalised boxes
  in [0,1] of this frame are what loc_encoder reads and loc_decoder writes.
- "sam": the image resized so its long side is S, centre-padded to S x S with zeros after normalisation.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SAM_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
SAM_STD = np.array([58.395, 57.12, 57.375], np.float32)


def square_offset(width: int, height: int) -> tuple[int, int, int]:
    """(L, dx, dy): the square side and where the image sits in it."""
    side = max(width, height)
    if width > height:
        return side, 0, (width - height) // 2
    return side, (height - width) // 2, 0


def clip_pixels(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> np.ndarray:
    """RGB image -> [1,3,size,size] float32: white square pad, bicubic resize, /255, CLIP mean/std."""
    side, dx, dy = square_offset(*image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, (dx, dy))
    x = np.asarray(square.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


def sam_resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w', h'): longest side to `size`, new = int(dim * scale + 0.5), at least 1 (the reference would ask Pillow
    for a 0-pixel side on a very thin image and fail)."""
    scale = size / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def sam_pixels(image: Image.Image, size: int, mean=SAM_MEAN, std=SAM_STD) -> np.ndarray:
    """RGB image -> [1,3,size,size] float32: long side to `size` (bilinear), SAM mean/std, centred zero pad."""
    w, h = sam_resized_size(*image.size, size)
    x = np.asarray(image.resize((w, h), Image.BILINEAR), np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    out = np.zeros((1, 3, size, size), np.float32)
    left, top = (size - w) // 2, (size - h) // 2
    out[0, :, top:top + h, left:left + w] = x.transpose(2, 0, 1)
    return out


def normalise_boxes(boxes_px: np.ndarray, width: int, height: int) -> np.ndarray:
    """Region-input boxes [M,4] xyxy in original pixels -> normalised square frame, clamped to [0,1]."""
    side, dx, dy = square_offset(width, height)
    b = np.asarray(boxes_px, np.float32).reshape(-1, 4).copy()
    b[:, 0::2] += dx
    b[:, 1::2] += dy
    return np.clip(b / side, 0.0, 1.0).astype(np.float32)


def boxes_to_pixels(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """Normalised square-frame boxes [K,4] -> original-image pixels; not clamped or reordered."""
    side, _, _ = square_offset(width, height)
    pad = (side - min(width, height)) // 2
    b = np.asarray(boxes, np.float32).reshape(-1, 4) * side
    if width < height:
        b[:, 0::2] -= pad
    else:
        b[:, 1::2] -= pad
    return b


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D bilinear resizing with align_corners=False (torch's interpolate)."""
    scale = n_in / n_out
    src = np.maximum((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def masks_to_image(low_res: np.ndarray, iou: np.ndarray, sam_size: int, width: int, height: int,
                   iou_threshold: float | None = 0.3) -> np.ndarray:
    """Low-res logits [K,1,h,w] (SAM-padded frame) -> [K,H,W] bool on the original image.

    The reference resizes twice, bilinear both times: to S x S, then to L x L (the padded square), thresholds at
    0 and crops the centre. Both resizes are linear, so they are applied as one matrix per axis, and only for the
    rows and columns that survive the crop. iou < iou_threshold drops the mask (all False); None keeps all."""
    k, _, h, w = low_res.shape
    side = max(width, height)
    pad = (side - min(width, height)) // 2
    ay = bilinear_matrix(sam_size, side) @ bilinear_matrix(h, sam_size)          # [L, h]
    ax = bilinear_matrix(sam_size, side) @ bilinear_matrix(w, sam_size)          # [L, w]
    if width < height:
        ax = ax[pad:pad + width]
    else:
        ay = ay[pad:pad + height]
    logits = (ay.astype(np.float32) @ low_res[:, 0].astype(np.float32)) @ ax.T.astype(np.float32)   # [K,H,W]
    masks = logits > 0
    if iou_threshold is not None:
        masks[np.asarray(iou).reshape(-1) < iou_threshold] = False
    return masks
