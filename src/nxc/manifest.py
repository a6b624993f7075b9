"""The build directory's manifest: what a build holds and how to check it. Torch-free (the runtime reads it).

    build/
      manifest.json          this file's content (schema SCHEMA)
      tokenizer.json         runtime tokenizer
      embeddings.npy         token-embedding table [V,H] (the runtime gathers rows itself)
      graphs/<graph>.onnx    the five graphs (+ <graph>.onnx.data when a graph is over 2 GB)
      reports/parity.json    ONNX Runtime vs torch on fresh inputs, written by the exporter

Every file but the manifest is listed under "files" with its sha256 and size; `verify` checks them all, so a
damaged or tampered build is refused with the file's name before anything runs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from nxc.specs import GraphSpec

SCHEMA = "nxc-build/1"
MANIFEST = "manifest.json"


class BuildError(ValueError):
    """A build directory that cannot be used: the message names the file and what to do."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_records(build: Path, exclude: tuple[str, ...] = (MANIFEST,)) -> dict[str, dict]:
    """{relative posix path: {"sha256", "bytes"}} of every file under `build`."""
    out = {}
    for p in sorted(build.rglob("*")):
        rel = p.relative_to(build).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
    return out


@dataclass(frozen=True)
class Manifest:
    data: dict
    root: Path

    @property
    def graphs(self) -> dict[str, dict]:
        return self.data["graphs"]

    def graph_spec(self, name: str) -> GraphSpec:
        return GraphSpec.from_dict(name, self.graphs[name])

    def graph_path(self, name: str) -> Path:
        if name not in self.graphs:
            raise BuildError(f"{self.root}: the build has no graph {name!r} (it has {sorted(self.graphs)}); "
                             "re-export it with nxc-export")
        return self.root / self.graphs[name]["file"]

    def path(self, rel: str) -> Path:
        return self.root / rel


def write_manifest(build: Path, data: dict) -> Path:
    """Record every file's hash and write manifest.json (last, after all other files exist)."""
    data = {"schema": SCHEMA, **data, "files": file_records(build)}
    path = build / MANIFEST
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def _inside(root: Path, rel: str) -> Path:
    p = (root / rel).resolve()
    if not p.is_relative_to(root.resolve()):
        raise BuildError(f"{root / MANIFEST}: file entry {rel!r} points outside the build directory; a build may "
                         "only reference its own files. Re-export the build.")
    return p


def load_manifest(build: str | Path, *, verify: bool = True) -> Manifest:
    """Read (and by default verify) a build directory's manifest."""
    root = Path(build)
    path = root / MANIFEST
    if not root.is_dir():
        raise BuildError(f"{root}: no such build directory; create one with `nxc-export --out {root}`")
    if not path.is_file():
        raise BuildError(f"{root}: not a build directory (no {MANIFEST}); create one with `nxc-export --out {root}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: not valid JSON ({e}); the build is damaged, re-export it") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise BuildError(f"{path}: manifest schema {schema!r}, this nxc reads {SCHEMA!r}; re-export the build with "
                         "this version of nxc-export")
    m = Manifest(data=data, root=root)
    if verify:
        verify_files(m)
    return m


def verify_files(m: Manifest) -> None:
    """Every listed file exists, has its recorded size and sha256; every graph file is listed."""
    files = m.data.get("files", {})
    for rel in [g["file"] for g in m.graphs.values()] + [ext for g in m.graphs.values() for ext in g.get("external_data", [])]:
        if rel not in files:
            raise BuildError(f"{m.root / MANIFEST}: graph file {rel!r} is not in the manifest's file list; "
                             "the build is damaged, re-export it")
    for rel, rec in files.items():
        p = _inside(m.root, rel)
        if not p.is_file():
            raise BuildError(f"{m.root / rel}: missing (the manifest lists it); the build is incomplete, re-export it")
        size = p.stat().st_size
        if size != rec["bytes"]:
            raise BuildError(f"{m.root / rel}: {size} bytes, the manifest says {rec['bytes']}; the file is truncated "
                             "or replaced, re-export the build")
        digest = sha256_file(p)
        if digest != rec["sha256"]:
            raise BuildError(f"{m.root / rel}: sha256 {digest[:16]}... does not match the manifest's "
                             f"{rec['sha256'][:16]}...; the file was modified, re-export the build")
