"""`nxc-export --modules FILE` (issue 29): a VITRON-style module table written into the build, and the generator a
`generate` module draws with (its CLIP text encoder exported beside it).

    FILE (JSON): {"grammar": "vitron", "region": "pixels",
                  "calls": {"A": {"task": "image generation", "backend": "generate"},
                            "B": {"task": "image segmentation", "backend": "segment"}},
                  "generator": {"path": "gen", "default_steps": 20, "default_guidance": 4.0}}   (for "generate")

"path" is a diffusers folder with text_encoder/ and tokenizer/, relative to FILE. read_modules checks the file before
anything is exported (one line naming what is wrong); the manifest checks the table against the graphs when the
build is written (nxc.manifest_modules).
"""
from __future__ import annotations

import json
from pathlib import Path

from nxc import names
from nxc.export.outdir import ExportError

KEYS = ("grammar", "region", "calls", "generator")
GENERATOR_KEYS = ("path", "default_steps", "default_guidance", "default_scheduler")


def read_modules(path: str | Path) -> dict:
    """The --modules file, checked: {"table": the manifest's modules entry, "generator": its options with "path"
    resolved, or None}."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExportError(f"--modules {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or set(data) - set(KEYS) or not isinstance(data.get("calls"), dict):
        raise ExportError(f"--modules {path}: expected an object with {', '.join(KEYS[:3])} (and \"generator\" "
                          "for a generate module), see nxc.export.modules")
    for name, call in data["calls"].items():
        backend = call.get("backend") if isinstance(call, dict) else None
        if backend not in names.MODULE_BACKENDS:
            raise ExportError(f"--modules {path}: calls.{name}.backend {backend!r} is not one of "
                              f"{', '.join(names.MODULE_BACKENDS)}")
    generator = data.get("generator")
    needs = any(c["backend"] in ("generate", "edit") for c in data["calls"].values())
    if needs and not isinstance(generator, dict):
        raise ExportError(f"--modules {path}: a generate module needs \"generator\": {{\"path\": a diffusers folder "
                          "with text_encoder/ and tokenizer/}}")
    if generator is not None:
        if not isinstance(generator, dict) or set(generator) - set(GENERATOR_KEYS) or "path" not in generator:
            raise ExportError(f"--modules {path}: \"generator\" takes {', '.join(GENERATOR_KEYS)} (path required)")
        folder = (path.parent / generator["path"]).resolve()
        if not folder.is_dir():
            raise ExportError(f"--modules {path}: generator.path {generator['path']!r} is not a folder "
                              f"({folder})")
        generator = {**generator, "path": folder}
    table = {k: data[k] for k in ("grammar", "region", "calls") if k in data}
    return {"table": table, "generator": generator}


def export_module_generator(generator: dict, out: Path, *, precision: str, parity: bool, log):
    """The generate modules' generator into the build (nxc.export.generator, with its text encoder)."""
    from nxc.export.generator import export_generator
    kwargs = {k: generator[k] for k in ("default_steps", "default_guidance", "default_scheduler") if k in generator}
    return export_generator(generator["path"], out, precision=precision, parity=parity, text_encoder=True, log=log,
                            **kwargs)
