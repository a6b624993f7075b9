"""Modules stay under about 400 lines (STYLE 12): a family or a graph that grows a module past it gets a module of
its own instead (issue 27: runtime/pipeline.py was 603 lines, export/exporter.py 492)."""
from pathlib import Path

import nxc

LIMIT = 420          # "about 400"


def test_no_module_is_over_about_400_lines():
    root = Path(nxc.__file__).parent
    long = {str(p.relative_to(root)): n for p in sorted(root.rglob("*.py"))
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > LIMIT}
    assert not long, f"modules over {LIMIT} lines: {long}; split them along a seam (STYLE 12)"
