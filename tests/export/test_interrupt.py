"""An export killed half-way leaves nothing that loads, and the next export succeeds."""
import subprocess
import sys
import time

import pytest

from nxc.export.exporter import ExportOptions, export_build
from nxc.manifest import BuildError, load_manifest


def test_killed_export_leaves_no_build_and_rerun_succeeds(tmp_path):
    out = tmp_path / "fp32"
    proc = subprocess.Popen([sys.executable, "-m", "nxc.export.cli", "--out", str(out)], stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 120
    for line in proc.stderr:                                   # kill it once graphs are being written
        if "[3/5]" in line or time.time() > deadline:
            break
    proc.kill()
    proc.wait()
    assert list(tmp_path.glob(".fp32.partial-*")), "the export was killed before it started writing"
    with pytest.raises(BuildError, match="no such build directory"):
        load_manifest(out)
    export_build(None, out, options=ExportOptions(parity=False))
    load_manifest(out)
    assert not list(tmp_path.glob(".fp32.partial-*"))        # the stale partial directory was cleaned up
