"""Image loading for the runtime: one clear error for anything that is not a usable picture. Pillow only."""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 80_000_000          # Pillow's own bomb limit is ~89 M; refuse before decoding anything bigger
MAX_STREAM_BYTES = 256 << 20     # read from a pipe or device (/dev/stdin), which has no size to check first


class ImageError(ValueError):
    """The input is not an image the pipeline can use; the message says why and what to do."""


def load_image(source: str | Path | bytes) -> Image.Image:
    """Path or bytes -> RGB PIL image with EXIF orientation applied. A path that is not a regular file (/dev/stdin,
    a pipe) is read whole first, up to MAX_STREAM_BYTES: Pillow needs to seek."""
    name = "<bytes>" if isinstance(source, (bytes, bytearray)) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb")
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{name}: is a directory; pass an image file") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
    except ValueError:                                      # open() of a path with a NUL character
        raise ImageError(f"{name!r}: is not a file path (it holds a NUL character)") from None
    with fp:
        if isinstance(source, (bytes, bytearray)):
            size = len(source)
        elif stat.S_ISREG((st := os.fstat(fp.fileno())).st_mode):
            size = st.st_size
        else:                                               # a pipe or a device: no size, no seek
            try:
                data = fp.read(MAX_STREAM_BYTES + 1)
            except OSError as e:
                raise ImageError(f"{name}: cannot be read ({e.strerror or e})") from None
            if len(data) > MAX_STREAM_BYTES:
                raise ImageError(f"{name}: more than {MAX_STREAM_BYTES >> 20} MB from a pipe or device; save the "
                                 "image to a file and pass its path")
            fp, size = io.BytesIO(data), len(data)
        if size == 0:
            raise ImageError(f"{name}: the file is empty (0 bytes); pass a PNG or JPEG")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(fp)
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"{name}: {img.width}x{img.height} is over {MAX_PIXELS // 1_000_000} M pixels; "
                                     "resize it first")
                img.load()
        except ImageError:
            raise
        except UnidentifiedImageError:
            raise ImageError(f"{name}: is not an image Pillow can read; pass a PNG or JPEG") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"{name}: is over {MAX_PIXELS // 1_000_000} M pixels (decompression-bomb guard); "
                             "resize it first") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: the image data is damaged or truncated ({e}); pass a complete PNG or JPEG") from None
    if img.width < 1 or img.height < 1:
        raise ImageError(f"{name}: the image is empty ({img.width}x{img.height})")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB")


BLANK_SIDE, BLANK_GREY = 64, 210


def blank_image() -> Image.Image:
    """The picture a turn carries when the user gives none to a model that draws from the text (NExT-GPT): plain
    light grey, 64 x 64. The shapes NExT-GPT was trained to draw on it (nxc.shapes.train_nextgpt) and nxc-eval's
    drawing requests are asked about it."""
    return Image.new("RGB", (BLANK_SIDE, BLANK_SIDE), (BLANK_GREY,) * 3)
