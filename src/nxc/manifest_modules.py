"""The manifest's optional `modules` entry (issue 29): VITRON's module calls as data. Torch-free.

    "modules": {"grammar": "vitron", "region": "pixels",
                "calls": {"B": {"task": "image segmentation", "backend": "segment"}}}

A reply that writes `<module>B</module><instruction>...</instruction><region>...</region>` (nxc.module_calls) runs
the backend its module names (nxc.runtime.modules); a module the table lacks is a reason in the result, never a
crash. Each backend needs graphs of the build (names.MODULE_BACKENDS), checked here so that a build that names a
backend it cannot run fails at load, in one line. A build without the entry loads as before (Manifest.modules None).
"""
from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from nxc import names
from nxc.jsonfield import Field
from nxc.manifest_types import GraphEntry, ModuleEntry, ModulesEntry


def parse_modules(f: Field, graphs: Mapping[str, GraphEntry]) -> ModulesEntry:
    f.object(known=("grammar", "region", "calls"))
    calls = {}
    for name, entry in f["calls"].items():
        if not name or any(c in name for c in "<>") or name != name.strip():
            raise f["calls"].error(f"{name!r} is not a module name a reply can write between <module> tags")
        entry.object(known=("task", "backend"))
        backend = entry["backend"].choice(tuple(names.MODULE_BACKENDS), "a module backend of this runtime")
        missing = [g for g in names.MODULE_BACKENDS[backend] if g not in graphs]
        if missing:
            raise entry["backend"].error(f"backend {backend!r} runs graphs {', '.join(missing)}, which this build "
                                         f"does not have (it has {', '.join(sorted(graphs))})")
        calls[name] = ModuleEntry(task=entry["task"].text(), backend=backend)
    if not calls:
        raise f["calls"].error("no module: a build with a modules entry names at least one")
    return ModulesEntry(grammar=f["grammar"].choice(names.MODULE_GRAMMARS, "a module-call grammar"),
                        region=f["region"].choice(names.REGION_FRAMES, "a region frame"),
                        calls=MappingProxyType(calls))
