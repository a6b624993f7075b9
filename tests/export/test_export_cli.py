"""nxc-export's one-line refusals before any graph is exported, and every torch-needing entry point in a
runtime-only install (torch made unimportable)."""
import os
import subprocess
import sys

import pytest

from nxc.export.cli import main


def _live_lock(out):
    (out.parent / f"{out.name}.lock").write_text(f"{os.getppid()}\n")     # the pytest runner's parent: alive
    return f"another nxc-export (pid {os.getppid()}) is writing {out}; wait for it or remove {out}.lock if it is gone"


@pytest.mark.parametrize("case", ["unconvertible_tokenizer", "parent_is_a_file", "locked"])
def test_export_refuses_before_exporting_any_graph(case, tiny_ckpt_export, unconvertible_ckpt, tmp_path, capsys):
    ckpt, out = tiny_ckpt_export, tmp_path / "builds" / "fp32"
    out.parent.mkdir()
    if case == "unconvertible_tokenizer":
        ckpt, expected = unconvertible_ckpt, ("the tokenizer does not convert to the runtime's tokenizer.json, so "
                                              "nothing was exported: ")
    elif case == "parent_is_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "fp32"
        expected = f"--out {out}: {tmp_path / 'file'} is a file, not a folder; choose another --out"
    else:
        expected = _live_lock(out)
    assert main([str(ckpt), "--out", str(out), "--graphs", "loc_heads", "--max-context", "64"]) == 1
    err = capsys.readouterr().err
    assert "exporting" not in err and "loading" not in err          # refused before the model is even loaded
    line = [x for x in err.splitlines() if x.startswith("nxc-export:")]
    assert len(line) == 1 and line[0].startswith(f"nxc-export: {expected}"), err
    if case != "parent_is_a_file":
        assert [p.name for p in out.parent.iterdir()] == ([f"{out.name}.lock"] if case == "locked" else [])


@pytest.mark.parametrize("script,argv,expected", [
    ("nxc-export", [], "nxc-export: needs the export extra (torch is not installed): pip install 'nxc[export]'"),
    ("nxc-eval", [], "nxc-eval: a checkpoint needs the export extra (torch is not installed): pip install "
                     "'nxc[export]' (a build directory from nxc-export runs without it)"),
    ("nxc-train-shapes", ["--out", "{tmp}/shapes"],
     "nxc-train-shapes: needs the export extra (torch is not installed): pip install 'nxc[export]'"),
    ("nxc-build", ["{tmp}"], "nxc-build: TensorRT is not installed (pip install 'nxc[trt]'); engines can only be "
                             "built on a machine with an NVIDIA GPU"),
    ("nxc-profile", ["{tmp}", "--vs-torch"],
     "nxc-profile: --vs-torch needs the export extra (torch is not installed): pip install 'nxc[export]'"),
])
def test_entry_points_in_a_runtime_only_install_say_what_to_install(script, argv, expected, tmp_path):
    """The installed console script's `main`, loaded as the script loads it, with the export and trt extras
    unimportable: one line on stderr, exit status 2, no traceback."""
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = f"""
import sys
for mod in ("torch", "torchvision", "transformers", "onnx", "segment_anything", "sentencepiece", "tensorrt"):
    sys.modules[mod] = None
from importlib.metadata import entry_points
sys.exit(entry_points(group="console_scripts")[{script!r}].load()({argv!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert (r.returncode, r.stderr.strip()) == (2, expected), r.stderr[-2000:]
    assert not (tmp_path / "shapes").exists()
