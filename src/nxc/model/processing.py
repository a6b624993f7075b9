"""Reference pre- and post-processing (reference §4 and §5.4), in torch/torchvision like the original.

Frames:
- "square": the image pasted on a white L x L square, L = max(W, H), centred on the short side.
  Boxes normalised to [0,1] in this frame are what loc_encoder reads and loc_decoder writes.
- "sam": the image resized so its long side is S, centre-padded to S x S with zeros after normalisation.

clip_pixels is the original's order, pad then resize, on purpose: it is the definition the runtime is checked
against. It needs the L x L square (4 L^2 bytes: 6.4 GB for a 40000 x 100 image); nxc.runtime.preprocess computes
the same pixels, bit for bit, without it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from nxc.model.sam import SAM_PIXEL_MEAN, SAM_PIXEL_STD

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP_RESAMPLE = "bicubic"


@dataclass(frozen=True)
class ClipPreprocess:
    """How an image becomes CLIP's pixel_values (§4.1): the CLIP directory's preprocessor_config.json
    (nxc.model.checkpoint reads it), or the standard CLIP values when it has none. `resample` is a Pillow filter
    name (PIL.Image.Resampling, lower case)."""
    size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: str = CLIP_RESAMPLE

    def pixels(self, image: Image.Image) -> torch.Tensor:
        return clip_pixels(image, self.size, mean=self.mean, std=self.std, resample=self.resample)

    def manifest(self) -> dict:
        """The manifest's preprocess.clip numbers (nxc.manifest_types.ImagePreprocess)."""
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std), "resample": self.resample}


def clip_preprocess_of(model) -> ClipPreprocess:
    """The model's CLIP preprocessing: what its checkpoint's CLIP directory says (set by load_nextchat), else the
    standard values at the vision tower's image size."""
    found = getattr(model, "clip_preprocess", None)
    return found if found is not None else ClipPreprocess(size=model.config.vision.image_size)


def square_offset(width: int, height: int) -> tuple[int, int, int]:
    """(L, dx, dy): the square side and where the image sits in it (reference §4.1)."""
    side = max(width, height)
    if width > height:
        return side, 0, (width - height) // 2
    return side, (height - width) // 2, 0


def clip_pixels(image: Image.Image, size: int, *, mean=CLIP_MEAN, std=CLIP_STD,
                resample: str = CLIP_RESAMPLE) -> torch.Tensor:
    """RGB image -> [1,3,size,size]: white square pad, resize (`resample`, a Pillow filter name), /255, mean/std."""
    image = image.convert("RGB")
    side, dx, dy = square_offset(*image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, (dx, dy))
    square = square.resize((size, size), Image.Resampling[resample.upper()])
    x = TF.to_tensor(square)
    return TF.normalize(x, list(mean), list(std)).unsqueeze(0)


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
