"""Draw detections on an image: translucent masks, boxes and their indices. Torch-free (numpy + Pillow)."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

PALETTE = ((255, 64, 64), (64, 200, 64), (64, 128, 255), (255, 200, 0), (200, 64, 255), (0, 200, 200))


def annotate(image: Image.Image, boxes, masks=None, *, alpha: float = 0.45) -> Image.Image:
    """A copy of `image` with mask k tinted, box k outlined and labelled `[k]`.

    boxes: [K,4] xyxy pixels of `image`; masks: K boolean [H,W] arrays or None entries.
    """
    out = np.asarray(image.convert("RGB"), dtype=np.float32).copy()
    for k, mask in enumerate(masks if masks is not None else []):
        if mask is not None and mask.shape == out.shape[:2]:
            colour = np.asarray(PALETTE[k % len(PALETTE)], np.float32)
            out[mask] = (1 - alpha) * out[mask] + alpha * colour
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for k, box in enumerate(boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        x1, x2 = sorted((x1, x2))
        y1, y2 = sorted((y1, y2))
        colour = PALETTE[k % len(PALETTE)]
        draw.rectangle((x1, y1, x2, y2), outline=colour, width=2)
        draw.text((x1 + 3, y1 + 2), f"[{k}]", fill=colour)
    return img
