"""Calibration inputs: images (a folder, or generated shapes scenes for the embedded model) and prompts."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DEFAULT_PROMPTS = ("Can you describe the image and include object locations?",
                   "Where is the main object in the image?",
                   "What is in the image?")


class CalibrationError(ValueError):
    """Calibration cannot run on what was given: the message says what and what to do."""


def calibration_images(folder: str | Path | None, *, samples: int, embedded: bool, seed: int = 0) -> list:
    """Up to `samples` RGB images: from `folder` (sorted by name), or generated shapes scenes for the embedded
    model. A real checkpoint without a folder is refused: synthetic shapes do not exercise its activations."""
    from nxc.runtime.images import ImageError, load_image
    if samples < 1:
        raise CalibrationError(f"--calib-samples must be at least 1, got {samples}")
    if folder is None:
        if not embedded:
            raise CalibrationError(
                "int8/int4 calibration of a real checkpoint needs --calib-images DIR (a few dozen images like the ones "
                "it will see): activation ranges measured on the kit's synthetic shapes would clip a real model's "
                "activations")
        from nxc.shapes.data import make_scene
        rng = np.random.default_rng(seed)
        return [make_scene(rng).image for _ in range(samples)]
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calib-images {folder}: not a directory")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CalibrationError(f"--calib-images {folder}: no images (looked for {', '.join(IMAGE_SUFFIXES)}); "
                               "put a few dozen representative images there")
    images = []
    for p in files[:samples]:
        try:
            images.append(load_image(p))
        except ImageError as e:
            raise CalibrationError(f"--calib-images: {e}. Remove or replace that file and export again") from None
    return images


def calibration_prompts(path: str | Path | None, *, embedded: bool) -> list[str]:
    """One prompt per non-empty line of `path`; default: grounding prompts (shapes ones for the embedded model)."""
    if path is None:
        if embedded:
            return ["Can you describe the image and include object locations?", "Where is the red circle in the image?",
                    "Where is the blue square in the image?", "Is there a green star in the image?"]
        return list(DEFAULT_PROMPTS)
    p = Path(path)
    try:
        lines = [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CalibrationError(f"--calib-prompts {p}: cannot be read ({e})") from None
    if not lines:
        raise CalibrationError(f"--calib-prompts {p}: no prompts (one per line)")
    return lines


def fingerprint(images, prompts, *, method: str, extra: str = "") -> str:
    """sha256 over the calibration data and settings: a cached range set is reused only for the same inputs."""
    h = hashlib.sha256()
    for im in images:
        h.update(f"{im.size}".encode())
        h.update(np.asarray(im).tobytes())
    for p in prompts:
        h.update(p.encode())
    h.update(f"{method}|{extra}".encode())
    return h.hexdigest()
