"""The export's memory does not grow with the LLaMA (issue 17): the int4 export of a NExT-Chat whose LLaMA has
TinyLlama-1.1B's sizes, made by nxc-make-checkpoint, peaks below half that LLaMA's float32 bytes (parity check
included), measured in its own process. (The true-size 7B figures are benchmarks/true_size.py's, in the README.)"""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from nxc.config import LLAMA_SIZES


def _llama_params(s) -> int:
    layer = s.hidden_size * s.head_dim * (2 * s.num_heads + 2 * s.num_kv_heads) + 3 * s.hidden_size * s.intermediate_size
    return s.num_layers * (layer + 2 * s.hidden_size) + 2 * 32005 * s.hidden_size + s.hidden_size


def _peak_kb(cmd: list[str]) -> tuple[int, str]:
    """Run `cmd` under a fresh wrapper process; its own peak RSS (RUSAGE_CHILDREN of the wrapper: only this child)."""
    code = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
            "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.stderr.write(r.stderr[-3000:])")
    res = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, timeout=1800)
    rc, kb = res.stdout.split()
    assert rc == "0", res.stderr
    return int(kb), res.stderr


def test_int4_export_of_a_1b_llama_peaks_below_half_its_float32_bytes(tmp_path):
    sizes = LLAMA_SIZES["tinyllama-1.1b"]
    fp32_bytes = 4 * _llama_params(sizes)
    assert 4.0e9 < fp32_bytes < 4.8e9                             # the 1.1B body: 4.4 GB in float32
    ckpt, out, calib = tmp_path / "ckpt", tmp_path / "int4", tmp_path / "calib"
    subprocess.run([sys.executable, "-m", "nxc.model.maker_cli", str(ckpt), "--llm", "tinyllama-1.1b", "--vision",
                    "tiny", "--sam", "tiny", "--dtype", "fp16", "--shard-size", "1GB"], check=True,
                   capture_output=True, timeout=900)
    calib.mkdir()
    for i in range(2):
        Image.fromarray((np.random.default_rng(i).random((240, 320, 3)) * 255).astype(np.uint8)).save(calib / f"{i}.png")
    kb, err = _peak_kb([sys.executable, "-m", "nxc.export.cli", str(ckpt), "--int4", "--out", str(out),
                        "--calib-images", str(calib), "--calib-samples", "2"])
    peak = kb * 1024
    assert peak < fp32_bytes / 2, f"peak RSS {peak / 1e9:.2f} GB, limit {fp32_bytes / 2e9:.2f} GB"
    assert "llm: layer 22/22" in err                                # per-layer progress
    parity = json.loads((out / "reports" / "parity.json").read_text())["llm"]
    assert parity["ok"] and len(parity["checks"][0]["rel_l2"]) == 2 + 3 * 22 - 1
    from nxc.manifest import load_manifest
    m = load_manifest(out)
    assert m.graphs["llm"].precision == "int4-weight-only"
    assert (out / "graphs" / "llm.onnx.data").stat().st_size < fp32_bytes / 6       # int4 weights, streamed out
