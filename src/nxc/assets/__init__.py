"""The shipped models, each trained here on synthetic shapes: NExT-Chat (the default; nxc.shapes.train), a
ChatRex-style retrieval model (nxc.shapes.train_retrieval), a NExT-GPT that draws (nxc.shapes.train_nextgpt, its
generator by nxc.shapes.train_generator) and a VITRON-style model that answers with module calls (nxc.shapes.train
with nxc.shapes.module_tasks; its GLIGEN generator by nxc.shapes.train_gligen). `embedded:NAME` names one on every command line."""
from __future__ import annotations

from pathlib import Path

EMBEDDED_NAME = "shapes-nextchat"
RETRIEVAL_NAME = "shapes-retrieval"
NEXTGPT_NAME = "shapes-nextgpt"
VITRON_NAME = "shapes-vitron"
SHIPPED = (EMBEDDED_NAME, RETRIEVAL_NAME, NEXTGPT_NAME, VITRON_NAME)
RETRAIN = {EMBEDDED_NAME: "nxc-train-shapes --out {path}",
           RETRIEVAL_NAME: "python -m nxc.shapes.train_retrieval --out {path} --proposals DIR",
           NEXTGPT_NAME: "nxc-train-shapes-generator --out GEN, then python -m nxc.shapes.train_nextgpt --out {path} "
                         "--generator GEN",
           VITRON_NAME: "nxc-train-shapes --out {path} --init embedded:shapes-nextchat with the module tasks, and "
                        "nxc-train-shapes-generator --out {path}/generator --gligen GEN (its training.json has both)"}


def shipped_checkpoint(name: str) -> Path:
    """Directory of the shipped checkpoint `name` (one of SHIPPED); its recipe is in its training.json."""
    if name not in SHIPPED:
        raise FileNotFoundError(f"embedded:{name}: the shipped models are "
                                + ", ".join(f"embedded:{n}" for n in SHIPPED))
    path = Path(__file__).parent / name
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"the embedded checkpoint {name} is missing from {path}: reinstall nxc, or retrain "
                                f"it with `{RETRAIN[name].format(path=path)}`")
    return path


def resolve_checkpoint(source: str | Path) -> Path:
    """`embedded:NAME` -> the shipped checkpoint's directory; anything else -> Path(source)."""
    s = str(source)
    return shipped_checkpoint(s[len("embedded:"):]) if s.startswith("embedded:") else Path(s)


def is_shipped(checkpoint: str | Path) -> bool:
    p = Path(checkpoint)
    return p.resolve().parent == Path(__file__).parent.resolve() and p.name in SHIPPED


def embedded_checkpoint() -> Path:
    """Directory of the default shipped checkpoint (official NExT-Chat layout, CLIP in its `clip/` subdirectory)."""
    return shipped_checkpoint(EMBEDDED_NAME)


def retrieval_checkpoint() -> Path:
    """Directory of the shipped retrieval model (nxc.model.retrieval; ChatRex-style)."""
    return shipped_checkpoint(RETRIEVAL_NAME)


def nextgpt_checkpoint() -> Path:
    """Directory of the shipped NExT-GPT (nxc.model.nextgpt; its generator in generator/)."""
    return shipped_checkpoint(NEXTGPT_NAME)


def vitron_checkpoint() -> Path:
    """Directory of the shipped VITRON-style model: the shapes NExT-Chat taught to answer with module calls, its
    modules.json (the module table nxc-export writes into its builds) and its GLIGEN generator in generator/."""
    return shipped_checkpoint(VITRON_NAME)
