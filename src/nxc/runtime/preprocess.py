"""Pre- and post-processing (reference §4, §5.4) in numpy and Pillow: the same numbers as nxc.model.processing.

Frames:
- "square": the image pasted on a white L x L square, L = max(W, H), centred on the short side. Normalised boxes
  in [0,1] of this frame are what loc_encoder reads and loc_decoder writes.
- "sam": the image resized so its long side is S, centre-padded to S x S with zeros after normalisation.

CLIP's pixels are Pillow's resize of the square, computed without making the square (a 1 x 100000 image would
need 40 GB for it). Pillow resizes in two 1-D passes, x then y, rounding to uint8 in between; the pass along the
long side has no padding and is Pillow's own, the pass along the padded side is replayed here with Pillow's
fixed-point weights, the padding entering as fill x (sum of the weights that land on it):

    W >= H:  image ─Pillow x──▶ [H, S] ─padded y (here)──▶ rows lo..hi of [S, S]  (the other rows: fill)
    W <  H:  image ─padded x (here)──▶ [H, k] columns lo..hi ─Pillow y──▶ [S, k] of [S, S]

so the result is the pad-then-resize image bit for bit (tests/runtime/test_preprocess.py), and memory is about
S x (short side) bytes plus 2 MB blocks instead of L x L x 4.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from PIL import Image

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)
SAM_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
SAM_STD = np.array([58.395, 57.12, 57.375], np.float32)
WHITE = 255

_PRECISION = 22          # Pillow's fixed point for 8-bit images (PRECISION_BITS in libImaging/Resample.c)
_BLOCK = 1 << 18         # samples (in, and out per 8 outputs) per block of a padded pass: 1 MB as int32


def _sinc(x: np.ndarray) -> np.ndarray:
    px = x * math.pi
    return np.where(x == 0.0, 1.0, np.sin(px) / np.where(x == 0.0, 1.0, px))


def _hamming(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    px = x * math.pi
    w = np.sin(px) / np.where(x == 0.0, 1.0, px) * (float(np.float32(0.54)) + float(np.float32(0.46)) * np.cos(px))
    return np.where(x == 0.0, 1.0, np.where(x >= 1.0, 0.0, w))


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, ((1.5 * x - 2.5) * x) * x + 1, np.where(x < 2.0, (((x - 5) * x + 8) * x - 4) * -0.5, 0.0))


# Pillow's resampling kernels (libImaging/Resample.c), name as in PIL.Image.Resampling -> (support, kernel)
_KERNELS = {
    "box": (0.5, lambda x: ((x > -0.5) & (x <= 0.5)).astype(np.float64)),
    "bilinear": (1.0, lambda x: np.where(np.abs(x) < 1.0, 1.0 - np.abs(x), 0.0)),
    "hamming": (1.0, _hamming),
    "bicubic": (2.0, _bicubic),
    "lanczos": (3.0, lambda x: np.where((x >= -3.0) & (x < 3.0), _sinc(x) * _sinc(x / 3), 0.0)),
}
PADDED_RESAMPLE = tuple(_KERNELS)                       # what clip_pixels can pad and resize
RESAMPLE = ("nearest",) + PADDED_RESAMPLE               # what sam_pixels can resize


def resample_filter(name: str, allowed: tuple[str, ...] = RESAMPLE) -> Image.Resampling:
    """A manifest's resample name -> Pillow's filter."""
    if name not in allowed:
        raise ValueError(f"resample {name!r} is not supported here; expected one of {', '.join(allowed)} "
                         "(the manifest's preprocess.*.resample)")
    return Image.Resampling[name.upper()]


def square_offset(width: int, height: int) -> tuple[int, int, int]:
    """(L, dx, dy): the square side and where the image sits in it."""
    side = max(width, height)
    if width > height:
        return side, 0, (width - height) // 2
    return side, (height - width) // 2, 0


def _windows(n_in: int, n_out: int, resample: str, rows: np.ndarray):
    """Pillow's filter windows for outputs `rows` of resizing n_in samples to n_out (precompute_coeffs):
    (center, first, count, support, filterscale)."""
    support, _ = _KERNELS[resample]
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support *= filterscale
    center = (rows + 0.5) * scale
    first = np.maximum((center - support + 0.5).astype(np.int64), 0)
    count = np.minimum((center + support + 0.5).astype(np.int64), n_in) - first
    return center, first, count, support, filterscale


def pillow_weights(n_in: int, n_out: int, resample: str, rows: np.ndarray | None = None):
    """Pillow's weights for outputs `rows` (default all) of resizing a line of n_in samples to n_out:
    (first [r] int64, w [r, taps] int64 in units of 2**-22); output i = clip((sum_t w[i,t] * x[first[i] + t] +
    2**21) >> 22, 0, 255). Taps past the window weigh 0. precompute_coeffs + normalize_coeffs_8bpc of
    libImaging/Resample.c, in float64 in the same order of operations."""
    rows = np.arange(n_out) if rows is None else np.asarray(rows)
    center, first, count, support, filterscale = _windows(n_in, n_out, resample, rows)
    t = np.arange(math.ceil(support) * 2 + 1)
    w = _KERNELS[resample][1](((first[:, None] + t).astype(np.float64) - center[:, None] + 0.5) * (1.0 / filterscale))
    w[t >= count[:, None]] = 0.0
    total = np.zeros(len(rows))
    for j in range(len(t)):                      # summed tap by tap, as Pillow's loop does
        total += w[:, j]
    np.divide(w, total[:, None], out=w, where=total[:, None] != 0.0)
    return first, np.trunc(w * float(1 << _PRECISION) + np.where(w < 0, -0.5, 0.5)).astype(np.int64)


class PaddedLine(NamedTuple):
    """Outputs lo..lo+k of resizing a line of padding with n image samples in it, those whose window reaches the
    image (the others read padding only and equal it). pad [k] int32: the weight that lands on the padding;
    blocks: (j, c0, w [<=8, c] int32): outputs lo+j.. take samples c0..c0+c of the image with weights w."""
    lo: int
    k: int
    pad: np.ndarray
    blocks: list[tuple[int, int, np.ndarray]]


def padded_line(side: int, offset: int, n: int, size: int, resample: str, block: int = 8) -> PaddedLine:
    """Pillow's weights for resizing a `side`-long line to `size` where samples offset..offset+n are the image."""
    _, first, count, _, _ = _windows(side, size, resample, np.arange(size))
    reach = np.flatnonzero((first < offset + n) & (first + count > offset))
    lo, hi = int(reach[0]), int(reach[-1]) + 1
    first, w = pillow_weights(side, size, resample, np.arange(lo, hi))
    pos = first[:, None] + np.arange(w.shape[1])
    inside = (pos >= offset) & (pos < offset + n)
    blocks = []
    for j in range(0, hi - lo, block):
        r, t = np.nonzero(inside[j:j + block])
        c = pos[j:j + block][r, t] - offset
        dense = np.zeros((min(block, hi - lo - j), int(c.max() - c.min()) + 1), np.int32)
        dense[r, c - c.min()] = w[j:j + block][r, t]
        blocks.append((j, int(c.min()), dense))
    return PaddedLine(lo, hi - lo, np.where(inside, 0, w).sum(1).astype(np.int32), blocks)


def _padded_pass(x: np.ndarray, line: PaddedLine, fill: int) -> np.ndarray:
    """One padded pass: x [m, n] uint8 (the image's n samples on each of m lines) -> [m, k] uint8. Sums in int32
    like Pillow's (exact: its sums fit), rounded like its clip8; a block of outputs at a time over the samples it
    reads, with einsum (one thread, no BLAS)."""
    out = np.empty((x.shape[0], line.k), np.uint8)
    for j, c0, w in line.blocks:
        acc = np.einsum("mn,kn->mk", x[:, c0:c0 + w.shape[1]].astype(np.int32), w)
        acc += fill * line.pad[j:j + len(w)] + (1 << (_PRECISION - 1))
        out[:, j:j + len(w)] = np.clip(acc >> _PRECISION, 0, 255)
    return out


def square_resize(image: Image.Image, size: int, fill: int = WHITE, resample: str = "bicubic") -> np.ndarray:
    """`image` pasted centred on a fill-coloured L x L square and resized to size x size by Pillow -> [size, size, 3]
    uint8, without making the square (module docstring)."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    width, height = image.size
    side, dx, dy = square_offset(width, height)
    filt = resample_filter(resample, PADDED_RESAMPLE)
    out = np.full((size, size, 3), fill, np.uint8)
    if width >= height:
        rows = np.asarray(image.resize((size, height), filt)).reshape(height, size * 3)
        line = padded_line(side, dy, height, size, resample)
        lo, k = line.lo, line.k
        part = np.empty((size * 3, k), np.uint8)
        step = max(1, _BLOCK // max(height, 8))
        for c in range(0, size * 3, step):                   # y pass over a block of columns
            part[c:c + step] = _padded_pass(rows[:, c:c + step].T, line, fill)
        out[lo:lo + k] = part.T.reshape(k, size, 3)
    else:
        line = padded_line(side, dx, width, size, resample)
        lo, k = line.lo, line.k
        cols = np.empty((height, 3, k), np.uint8)
        step = max(1, _BLOCK // (3 * max(width, 8)))
        for r in range(0, height, step):                     # x pass over a block of rows
            strip = np.asarray(image.crop((0, r, width, min(height, r + step))))
            x = strip.transpose(0, 2, 1).reshape(-1, width)
            cols[r:r + step] = _padded_pass(x, line, fill).reshape(len(strip), 3, k)
        tall = Image.fromarray(np.ascontiguousarray(cols.transpose(0, 2, 1)))
        out[:, lo:lo + k] = np.asarray(tall.resize((k, size), filt))
    return out


def clip_pixels(image: Image.Image, size: int, mean=CLIP_MEAN, std=CLIP_STD, resample: str = "bicubic") -> np.ndarray:
    """RGB image -> [1,3,size,size] float32: white square pad, resize (`resample`), /255, CLIP mean/std."""
    x = square_resize(image, size, WHITE, resample).astype(np.float32)
    x /= 255.0
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def sam_resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w', h'): longest side to `size`, new = int(dim * scale + 0.5), at least 1 (the reference would ask Pillow
    for a 0-pixel side on a very thin image and fail)."""
    scale = size / max(width, height)
    return max(1, int(width * scale + 0.5)), max(1, int(height * scale + 0.5))


def sam_pixels(image: Image.Image, size: int, mean=SAM_MEAN, std=SAM_STD, resample: str = "bilinear") -> np.ndarray:
    """RGB image -> [1,3,size,size] float32: long side to `size` (`resample`), SAM mean/std, centred zero pad.
    Resized first, so memory is the output's."""
    w, h = sam_resized_size(*image.size, size)
    image = image if image.mode == "RGB" else image.convert("RGB")
    x = np.array(image.resize((w, h), resample_filter(resample)), np.float32)
    x -= np.asarray(mean, np.float32)
    x /= np.asarray(std, np.float32)
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


def _bilinear_taps(n_in: int, n_out: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i0, i1, lam) of output `rows` of 1-D bilinear resizing with align_corners=False (torch's interpolate):
    out[r] = (1 - lam) * x[i0] + lam * x[i1]."""
    src = np.maximum((rows.astype(np.float64) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    return i0, np.minimum(i0 + 1, n_in - 1), src - i0


def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D bilinear resizing with align_corners=False (torch's interpolate)."""
    i0, i1, lam = _bilinear_taps(n_in, n_out, np.arange(n_out))
    w = np.zeros((n_out, n_in), np.float64)
    np.add.at(w, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(w, (np.arange(n_out), i1), lam)
    return w


def _twice_bilinear(inner: np.ndarray, sam_size: int, side: int, rows: np.ndarray) -> np.ndarray:
    """[len(rows), n_low] float32: rows `rows` of bilinear_matrix(sam_size, side) @ inner, inner =
    bilinear_matrix(n_low, sam_size), without the [side, sam_size] matrix (it has two taps a row)."""
    i0, i1, lam = _bilinear_taps(sam_size, side, rows)
    return ((1.0 - lam)[:, None] * inner[i0] + lam[:, None] * inner[i1]).astype(np.float32)


def masks_to_image(low_res: np.ndarray, iou: np.ndarray, sam_size: int, width: int, height: int,
                   iou_threshold: float | None = 0.3) -> np.ndarray:
    """Low-res logits [K,1,h,w] (SAM-padded frame) -> [K,H,W] bool on the original image.

    The reference resizes twice, bilinear both times: to S x S, then to L x L (the padded square), thresholds at
    0 and crops the centre. Both resizes are linear, so they are applied as one matrix per axis, and only for the
    rows and columns that survive the crop: the short axis first, the long one in blocks, so memory stays near the
    output's. iou < iou_threshold drops the mask (all False); None keeps all."""
    k, _, h, w = low_res.shape
    side = max(width, height)
    pad = (side - min(width, height)) // 2
    ys = np.arange(height) + (0 if width < height else pad)       # rows and columns of the L x L frame kept
    xs = np.arange(width) + (pad if width < height else 0)
    low = low_res[:, 0].astype(np.float32)
    ay, ax = bilinear_matrix(h, sam_size), bilinear_matrix(w, sam_size)
    masks = np.empty((k, height, width), bool)
    budget = 1 << 18                                                 # elements per block
    if height >= width:
        t = low @ _twice_bilinear(ax, sam_size, side, xs).T                          # [K, h, W]
        step = max(1, min(budget // max(1, k * width), budget // h))
        for r in range(0, height, step):
            masks[:, r:r + step] = (_twice_bilinear(ay, sam_size, side, ys[r:r + step]) @ t) > 0
    else:
        t = _twice_bilinear(ay, sam_size, side, ys) @ low                            # [K, H, w]
        step = max(1, min(budget // max(1, k * height), budget // w))
        for c in range(0, width, step):
            masks[:, :, c:c + step] = (t @ _twice_bilinear(ax, sam_size, side, xs[c:c + step]).T) > 0
    if iou_threshold is not None:
        masks[np.asarray(iou).reshape(-1) < iou_threshold] = False
    return masks
