"""Reference pre- and post-processing (reference §4 and §5.4), in torch/torchvision like the original.

Frames:
- "square": the image pasted on a white L x L square, L = max(W, H), centred on the short side.
  Boxes normalised to [0,1] in this frame are what loc_encoder reads and loc_decoder writes.
- "sam": the image resized so its long side is S, centre-padded to S x S with zeros after normalisation.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from nxc.model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def square_offset(width: int, height: int) -> tuple[int, int, int]:
    """(L, dx, dy): the square side and where the image sits in it (reference §4.1)."""
    side = max(width, height)
    if width > height:
        return side, 0, (width - height) // 2
    return side, (height - width) // 2, 0


def clip_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [1,3,size,size]: white square pad, bicubic resize, /255, CLIP mean/std."""
    image = image.convert("RGB")
    side, dx, dy = square_offset(*image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, (dx, dy))
    square = square.resize((size, size), Image.BICUBIC)
    x = TF.to_tensor(square)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD).unsqueeze(0)


def sam_resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w', h'): longest side to `size`, new = int(dim * scale + 0.5) (reference §4.2)."""
    scale = size / max(width, height)
    return int(width * scale + 0.5), int(height * scale + 0.5)


def sam_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [1,3,size,size]: long side to `size` (bilinear), SAM mean/std, centred zero pad."""
    image = image.convert("RGB")
    w, h = sam_resized_size(*image.size, size)
    resized = TF.resize(image, [h, w], interpolation=TF.InterpolationMode.BILINEAR)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32)).permute(2, 0, 1)
    x = (x - torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
    left, top = (size - w) // 2, (size - h) // 2
    x = F.pad(x, (left, size - w - left, top, size - h - top), value=0.0)
    return x.unsqueeze(0)


def normalise_boxes(boxes_px, width: int, height: int) -> torch.Tensor:
    """Region-input boxes [M,4] xyxy in original pixels -> normalised square frame, clamped to [0,1] (§3.4)."""
    side, dx, dy = square_offset(width, height)
    b = torch.as_tensor(boxes_px, dtype=torch.float32).reshape(-1, 4).clone()
    b[:, 0::2] += dx
    b[:, 1::2] += dy
    return (b / side).clamp(0.0, 1.0)


def boxes_to_pixels(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalised square-frame boxes [K,4] -> original-image pixels; not clamped or reordered (§5.4)."""
    side, _, _ = square_offset(width, height)
    pad = (side - min(width, height)) // 2
    b = boxes.float() * side
    if width < height:
        b[:, 0::2] -= pad
    else:
        b[:, 1::2] -= pad
    return b


def masks_to_image(mask_logits: torch.Tensor, iou: torch.Tensor, width: int, height: int,
                   iou_threshold: float | None = 0.3) -> torch.Tensor:
    """[K,1,S,S] logits (SAM-padded frame) -> [K,H,W] bool on the original image (§5.4).

    Detections with iou < iou_threshold get all-zero logits (mask dropped, box kept); None disables it.
    """
    logits = mask_logits.float().clone()
    if iou_threshold is not None:
        logits[iou[:, 0] < iou_threshold] = 0.0
    side = max(width, height)
    pad = (side - min(width, height)) // 2
    full = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)[:, 0] > 0
    if width < height:
        return full[:, :, pad:pad + width]
    return full[:, pad:pad + height, :]
