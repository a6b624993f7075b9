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
from PIL import Image, ImageSequence

from nxc.runtime.images import MAX_PIXELS, ImageError

MAX_FRAMES = 8                   # frames a video is sampled to by default (VITRON samples a clip to 8)
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
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_PIXELS:
                raise ImageError(f"{path}: {img.width}x{img.height} frames are over {MAX_PIXELS // 1_000_000} M pixels")
            frames = [f.convert("RGB") for f in ImageSequence.Iterator(img)]
            duration = img.info.get("duration")
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{path}: not a video Pillow can read ({e})") from None
    fps = 1000.0 / duration if duration else None
    return Video(tuple(frames[i] for i in even_indices(len(frames), max_frames)), fps=fps)


def _pyav(path: Path, max_frames: int) -> Video:
    try:
        import av
    except ImportError:
        raise ImageError(f"{path}: reading {path.suffix} needs PyAV: pip install 'nxc[video]' (or pass a GIF)") from None
    try:
        with av.open(str(path)) as box:
            stream = box.streams.video[0]
            frames = [f.to_image() for f in box.decode(stream)]
            fps = float(stream.average_rate) if stream.average_rate else None
    except (av.FFmpegError, IndexError) as e:
        raise ImageError(f"{path}: not a video PyAV can decode ({e})") from None
    if not frames:
        raise ImageError(f"{path}: the video has no frames")
    return Video(tuple(frames[i] for i in even_indices(len(frames), max_frames)), fps=fps)


def mean_rows(rows: list[np.ndarray]) -> np.ndarray:
    """The frames' image rows [N,H] averaged over time (VITRON's video input), float32."""
    return np.mean(np.stack(rows), axis=0).astype(np.float32)
