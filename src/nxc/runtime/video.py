"""A video as a conversation's picture (issue 29: VITRON's video input): its frames, sampled evenly, each through
the image tower, the image rows averaged over time (nxc.runtime.conversation.Conversation.features).

    load_video("clip.gif" | "clip.mp4", max_frames=8) ─▶ Video(frames: RGB PIL images of one size, fps)
    pipe.chat(video, "What moves?")                    (a Video where an image goes: Conversation takes either)

A GIF, an animated PNG or WebP is read by Pillow; an MP4 / WebM / MOV by PyAV (`pip install 'nxc[video]'`), only
if it is installed. Torch-free. The first frame is the conversation's image for everything per-image (SAM's
embedding, the box head's pixels); a module call's `track` backend runs over every frame.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from nxc.runtime.images import MAX_PIXELS, ImageError

MAX_FRAMES = 8                   # frames a video is sampled to by default (VITRON samples a clip to 8)
MAX_DECODED_FRAMES = 3000        # a clip without a frame count in its header is decoded whole, up to this
PILLOW_VIDEO = (".gif", ".png", ".apng", ".webp")
PYAV_VIDEO = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".m4v")


@dataclass(frozen=True)
class Video:
    """frames: RGB PIL images of one size, in time order; fps: frames per second of the source (None: unknown)."""
    frames: tuple
    fps: float | None = None

    def __post_init__(self):
        if not self.frames:
            raise ImageError("a video needs at least one frame")
        if any(not isinstance(f, Image.Image) for f in self.frames):
            raise ImageError("a video's frames must be PIL images")
        sizes = {f.size for f in self.frames}
        if len(sizes) > 1:
            raise ImageError(f"a video's frames must share one size, got {sorted(sizes)}")
        object.__setattr__(self, "frames", tuple(f.convert("RGB") for f in self.frames))

    @property
    def size(self) -> tuple[int, int]:
        return self.frames[0].size


def even_indices(total: int, n: int) -> list[int]:
    """n indices spread evenly over range(total) (all of them when total <= n): each the middle of its share."""
    if total <= n:
        return list(range(total))
    return [int((k + 0.5) * total / n) for k in range(n)]


def load_video(path: str | Path, *, max_frames: int = MAX_FRAMES) -> Video:
    """A video file -> Video of at most `max_frames` frames, sampled evenly; ImageError, one line, for a file that
    is missing, not a video, or an MP4 without PyAV."""
    path = Path(path)
    if max_frames < 1:
        raise ImageError(f"max_frames must be >= 1, got {max_frames}")
    if not path.is_file():
        raise ImageError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in PYAV_VIDEO:
        return _pyav(path, max_frames)
    if suffix not in PILLOW_VIDEO:
        raise ImageError(f"{path}: not a video nxc reads ({', '.join(PILLOW_VIDEO + PYAV_VIDEO)})")
    return _pillow(path, path, max_frames)


def video_from_bytes(data: bytes, *, max_frames: int = MAX_FRAMES) -> Video:
    """A video file's bytes (nxc-serve's video_url part): a GIF / PNG / WebP by its magic number, anything else
    through PyAV."""
    import io
    if not data:
        raise ImageError("the video is empty (0 bytes)")
    if data[:6] in (b"GIF87a", b"GIF89a") or data[:8] == b"\x89PNG\r\n\x1a\n" or data[8:12] == b"WEBP":
        return _pillow(io.BytesIO(data), "<video bytes>", max_frames)
    return _pyav(io.BytesIO(data), max_frames, name="<video bytes>")


def _pillow(source, name, max_frames: int) -> Video:
    path = name
    try:
        with Image.open(source) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{path}: {img.width}x{img.height} frames are over {MAX_PIXELS // 1_000_000} M pixels")
            keep = even_indices(getattr(img, "n_frames", 1), max_frames)
            frames = []
            for k in keep:                               # only the sampled frames are decoded to RGB copies
                img.seek(k)
                frames.append(img.convert("RGB"))
            duration = img.info.get("duration")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a video Pillow can read ({e})") from None
    fps = 1000.0 / duration if duration else None
    return Video(tuple(frames), fps=fps)


def _pyav(path, max_frames: int, name: str | None = None) -> Video:
    name = name or str(path)
    try:
        import av
    except ImportError:
        raise ImageError(f"{name}: reading an MP4 / WebM / MOV needs PyAV: pip install 'nxc[video]' (or send a "
                         "GIF)") from None
    try:
        with av.open(path if not isinstance(path, Path) else str(path)) as box:
            stream = box.streams.video[0]
            fps = float(stream.average_rate) if stream.average_rate else None
            keep = set(even_indices(stream.frames, max_frames)) if stream.frames else None
            frames = []
            for k, f in enumerate(box.decode(stream)):   # a known length: only the sampled frames are kept
                if keep is None or k in keep:
                    frames.append(f.to_image())
                if keep is None and len(frames) > MAX_DECODED_FRAMES:
                    raise ImageError(f"{name}: over {MAX_DECODED_FRAMES} frames and no frame count in its header; "
                                     "cut the clip first")
    except (av.FFmpegError, IndexError) as e:
        raise ImageError(f"{name}: not a video PyAV can decode ({e})") from None
    if not frames:
        raise ImageError(f"{name}: the video has no frames")
    return Video(tuple(frames[i] for i in even_indices(len(frames), max_frames)), fps=fps)   # no-op when kept


def mean_rows(rows: list[np.ndarray]) -> np.ndarray:
    """The frames' image rows [N,H] averaged over time (VITRON's video input), float32."""
    return np.mean(np.stack(rows), axis=0).astype(np.float32)
