"""The embedded default model: a small NExT-Chat trained on synthetic shapes (see nxc.shapes.train)."""
from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "shapes-nextchat"


def embedded_checkpoint() -> Path:
    """Directory of the shipped checkpoint (official NExT-Chat layout, CLIP in its `clip/` subdirectory)."""
    path = Path(__file__).parent / EMBEDDED_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"the embedded checkpoint is missing from {path}: reinstall nxc, or retrain it with "
            f"`nxc-train-shapes --out {path}`.")
    return path


RETRIEVAL_NAME = "shapes-retrieval"


def retrieval_checkpoint() -> Path:
    """Directory of the shipped retrieval model (nxc.model.retrieval; ChatRex-style, trained on the same shapes by
    nxc.shapes.train_retrieval, its recipe in training.json)."""
    path = Path(__file__).parent / RETRIEVAL_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded retrieval checkpoint is missing from {path}: reinstall nxc, or retrain "
                                f"it with `python -m nxc.shapes.train_retrieval --out {path} --proposals DIR`.")
    return path
