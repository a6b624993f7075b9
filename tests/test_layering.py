"""Who may import whom inside nxc, read from the source with `ast` (no module is imported): every import counts,
at module level or inside a function, and so does `__import__("x")` / `importlib.import_module("x")` on a literal.
A ◀── B: B may import A, and A never imports B.

    prompt, tokens, names, config, specs, manifest(_types), jsonfield  (contracts: nothing from model, runtime, export, calib)
         ▲                       ▲
       model                  runtime     (no torch, transformers, onnx; nothing from model, export, calib, shapes)
         ▲                       ▲
       calib ◀─────────────── export

and nxc.model never imports nxc.serve or nxc.triton either; nxc.doctor runs on the device beside the runtime and
keeps the runtime's rules; nxc.diffusion, the generator's sampler that the reference and the runtime share, keeps
the contracts' and imports no torch, transformers, onnx or diffusers either. Inside nxc.model no two modules import
each other, directly or around a longer circle (a function-level import that only dodges the circle still counts):
a name both need lives in a module both import.
"""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
CONTRACT_FORBIDS = ("nxc.model", "nxc.runtime", "nxc.export", "nxc.calib")
# package or module -> what no module in it may import (a name matches itself and its submodules)
FORBIDDEN = {
    "nxc.model": ("nxc.runtime", "nxc.export", "nxc.calib", "nxc.serve", "nxc.triton"),
    "nxc.calib": ("nxc.export",),
    "nxc.runtime": ("nxc.model", "nxc.export", "nxc.calib", "nxc.shapes", "torch", "transformers", "onnx"),
    "nxc.doctor": ("nxc.model", "nxc.export", "nxc.calib", "nxc.shapes", "torch", "transformers", "onnx"),
    # the generator's sampler, shared by the torch reference and the runtime: numpy and the contracts only
    "nxc.diffusion": (*CONTRACT_FORBIDS, "nxc.shapes", "torch", "transformers", "onnx", "diffusers"),
    **{m: CONTRACT_FORBIDS for m in ("nxc.prompt", "nxc.tokens", "nxc.names", "nxc.config", "nxc.specs",
                                     "nxc.manifest", "nxc.manifest_types", "nxc.manifest_generator",
                                     "nxc.manifest_modules", "nxc.module_calls", "nxc.clip_tokenizer",
                                     "nxc.jsonfield")},
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def imports(module: str, source: str, *, is_package: bool = False) -> list[tuple[int, str, str]]:
    """(line, imported module, the statement as written) for every import in `source`, the code of `module`.
    `from a import b` yields both a and a.b (b may be a submodule); relative imports are resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, ast.unparse(node)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], node.module or ""] if node.level
                            else [node.module]).strip(".")
            found.append((node.lineno, base, ast.unparse(node)))
            found += [(node.lineno, f"{base}.{a.name}", ast.unparse(node)) for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "id", None) == "__import__"
                   or getattr(node.func, "attr", None) == "import_module")):
            found.append((node.lineno, node.args[0].value, ast.unparse(node)))
    return found


def violations(module: str, source: str, *, path: str = "<source>", is_package: bool = False) -> list[str]:
    """One line per crossing import statement: file, line, the statement and the rule it breaks."""
    rules = [banned for layer, banned in FORBIDDEN.items() if _within(module, layer)]
    found: dict[tuple[int, str], str] = {}
    for line, name, stmt in imports(module, source, is_package=is_package):
        for banned in rules:
            if any(_within(name, b) for b in banned):
                found.setdefault((line, stmt), f"{path}:{line}: `{stmt}` imports {name}, which {module} must not "
                                               f"import (no {', '.join(banned)})")
    return list(found.values())


def _modules() -> list[tuple[str, Path]]:
    files = sorted((SRC / "nxc").rglob("*.py"))
    assert files, f"expected the nxc sources under {SRC}, found no .py file there"
    return [(".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__"), f) for f in files]


def test_every_module_keeps_to_its_layer():
    found = []
    for module, f in _modules():
        found += violations(module, f.read_text(encoding="utf-8"), path=str(f.relative_to(SRC.parent)),
                            is_package=f.name == "__init__.py")
    if found:
        pytest.fail("imports across layers:\n" + "\n".join(found), pytrace=False)


def test_every_rule_names_an_existing_module():
    modules = {m for m, _ in _modules()}
    missing = [layer for layer in FORBIDDEN if layer not in modules]
    assert not missing, f"FORBIDDEN names {missing}, which are not modules under {SRC / 'nxc'}"


@pytest.mark.parametrize("module, source, expected", [
    ("nxc.runtime.pipeline", "import numpy\n\ndef f():\n    import torch.nn\n",
     "x.py:4: `import torch.nn` imports torch.nn, which nxc.runtime.pipeline must not import"),
    ("nxc.runtime.backends.ort", "def f():\n    return __import__('onnx')\n",
     "x.py:2: `__import__('onnx')` imports onnx"),
    ("nxc.calib.build", "from nxc.export.exporter import EXTERNAL_DATA_BYTES\n",
     "x.py:1: `from nxc.export.exporter import EXTERNAL_DATA_BYTES` imports nxc.export.exporter"),
    ("nxc.calib.build", "from nxc import export\n", "x.py:1: `from nxc import export` imports nxc.export,"),
    ("nxc.diffusion.loop", "import diffusers.schedulers\n", "x.py:1: `import diffusers.schedulers` imports diffusers"),
    ("nxc.model.sam", "from ..runtime import images\n", "x.py:1: `from ..runtime import images` imports nxc.runtime,"),
    ("nxc.manifest", "import importlib\nimportlib.import_module('nxc.model.sam')\n",
     "x.py:2: `importlib.import_module('nxc.model.sam')` imports nxc.model.sam"),
])
def test_a_crossing_import_is_reported_with_file_line_and_statement(module, source, expected):
    found = violations(module, source, path="x.py")
    assert found and found[0].startswith(expected), found


@pytest.mark.parametrize("module, source", [
    ("nxc.runtime.backends.ort", "import onnxruntime\n"),          # onnxruntime is not onnx
    ("nxc.export.exporter", "from nxc.calib.quantize import compare_graphs\n"),
    ("nxc.calib.quantize", "from nxc.model.reference import ReferenceChat\n"),
])
def test_allowed_imports_pass(module, source):
    assert violations(module, source, path="x.py") == []


# packages inside which no import circle may form (every import counts, function-level ones included)
NO_CYCLES_IN = ("nxc.model",)


def import_cycles(sources: dict[str, str], within: str) -> list[str]:
    """Each import circle among the modules of `sources` ({module: code}) under `within`, once, as
    `a -> b -> a` with the file line of each step."""
    mods = {m for m in sources if _within(m, within)}
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    for m in sorted(mods):
        for line, name, _ in imports(m, sources[m], is_package=m == within):
            if name in mods and name != m:
                edges[m].setdefault(name, line)
    found: dict[frozenset, str] = {}
    for start in sorted(mods):                    # the shortest circle through each module, breadth first
        back: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in back:
            nxt = []
            for a in frontier:
                for b in sorted(edges[a]):
                    if b not in back:
                        back[b] = a
                        nxt.append(b)
            frontier = nxt
        if start in back:
            circle = [start]
            while len(circle) == 1 or circle[-1] != start:
                circle.append(back[circle[-1]])
            circle.reverse()
            steps = " -> ".join(f"{a} (line {edges[a][b]})" for a, b in zip(circle, circle[1:]))
            found.setdefault(frozenset(circle), f"{steps} -> {start}")
    return sorted(found.values())


def test_no_import_cycle_inside_the_model_package():
    sources = {m: f.read_text(encoding="utf-8") for m, f in _modules()}
    found = [c for package in NO_CYCLES_IN for c in import_cycles(sources, package)]
    if found:
        pytest.fail("import circles (move the names both modules need to a module both import):\n"
                    + "\n".join(found), pytrace=False)


def test_an_import_cycle_is_found_through_a_function_level_import():
    sources = {"nxc.model": "", "nxc.model.a": "from nxc.model.b import B\n",
               "nxc.model.b": "import torch\n\ndef f():\n    from nxc.model import c\n",
               "nxc.model.c": "from .a import A\n", "nxc.model.d": "from nxc.model.a import A\n"}
    assert import_cycles(sources, "nxc.model") == [
        "nxc.model.a (line 1) -> nxc.model.b (line 4) -> nxc.model.c (line 1) -> nxc.model.a"]
    assert import_cycles({**sources, "nxc.model.c": "import numpy\n"}, "nxc.model") == []
