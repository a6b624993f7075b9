"""benchmarks/generate_vs.py at its tiny size, end to end (the SD-1.5 run is not made in CI): every side runs in
its own measured process, the JSON has each side's figures and the targets, and nxc's picture equals diffusers'
PyTorch loop's within the issue's 1e-3. Also the streamed writer of the SD-1.5 folder, on a small config."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "generate_vs.py"


@pytest.fixture(scope="module")
def gv():
    spec = importlib.util.spec_from_file_location("generate_vs", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_tiny_run_end_to_end(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    out = tmp_path / "result.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "4", "--threads", "1",
                          "--work", str(tmp_path / "work"), "--json", str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert r == json.loads(out.read_text())
    assert {"machine", "make", "export", "nxc", "torch", "optimum", "pictures", "ratios"} <= set(r)
    assert r["picture"] == [16, 16] and r["machine"]["cpu_count"] >= 1
    for side in ("make", "export", "nxc", "torch"):
        assert r[side]["ok"] and r[side]["peak_rss_gb"] > 0, r[side]
    assert set(r["export"]["parity_seconds"]) == {"denoiser", "latent_decoder"}
    for side in ("nxc", "torch"):
        s = r[side]
        assert s["denoise_steps"] == 4 and s["picture_shape"] == [3, 16, 16]
        assert 0 < s["denoise_step_seconds"] <= s["picture_seconds"]
    assert r["nxc"]["torch_imported"] is False                  # the runtime's process stays torch-free
    assert r["nxc"]["files_gb"] > 0
    assert r["pictures"]["agree"] and r["pictures"]["max_abs_diff"] <= 1e-3
    assert set(r["ratios"]) >= {"denoise_step_speedup_vs_torch", "denoise_step_target_met", "rss_budget_gb",
                                "rss_target_met", "nxc_peak_rss_gb", "torch_peak_rss_gb"}
    assert isinstance(r["optimum"], (str, dict))
    assert not (tmp_path / "work").exists()                     # no --keep: WORK is removed


def test_tiny_gligen_run_agrees_with_the_gligen_loop(tmp_path):
    """--gligen: a tiny GLIGEN folder, two phrases in two boxes; nxc's picture equals StableDiffusionGLIGENPipeline's
    loop written out, and the grounded and plain steps are timed apart."""
    pytest.importorskip("diffusers")
    res = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "10", "--threads", "1", "--gligen",
                          "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert r["gligen"] and r["pictures"]["agree"] and r["pictures"]["max_abs_diff"] <= 1e-3
    assert set(r["export"]["parity_seconds"]) == {"denoiser", "latent_decoder", "latent_encoder", "text_encoder"}
    for side in ("nxc", "torch"):
        assert r[side]["grounded_step_seconds"] > 0 and r[side]["plain_step_seconds"] > 0
    assert {"grounded_step_speedup_vs_torch", "plain_step_speedup_vs_torch"} <= set(r["ratios"])


def test_tiny_gligen_edit_agrees_and_reuses_the_build(tmp_path):
    """--gligen --edit: an edit of the fixed picture, in the WORK an earlier --gligen run left (--keep): the folder
    and the build are reused; nxc's edit equals the pipeline's inpainting loop (posterior and per-step noise drawn
    alike) and differs from a fresh picture of the same seed."""
    pytest.importorskip("diffusers")
    import numpy as np
    work = tmp_path / "work"
    base = [sys.executable, str(SCRIPT), "--size", "tiny", "--steps", "10", "--threads", "1", "--gligen",
            "--work", str(work), "--keep"]
    assert subprocess.run(base, capture_output=True, text=True).returncode == 0
    fresh = np.load(work / "pictures" / "nxc.npy")
    res = subprocess.run(base + ["--edit"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads(res.stdout)
    assert r["edit"] and r["make"].get("reused") and r["export"].get("reused")
    assert r["pictures"]["agree"] and r["pictures"]["max_abs_diff"] <= 1e-3
    spec = importlib.util.spec_from_file_location("generate_vs", SCRIPT)
    gv = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gv)
    edited = np.load(work / "pictures" / "nxc.npy")               # [3,16,16] in [0, 1]
    assert edited.shape == (3, 16, 16)
    assert np.abs(edited - np.load(work / "pictures" / "torch.npy")).max() <= 1e-3
    assert np.abs(edited - fresh).max() > 0.05                    # an edit of the source, not the fresh picture
    assert gv.grounding_of(type("A", (), {"edit": True})())[0] == ["a red circle"]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--edit"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--edit needs --gligen" in bad.stderr


def test_streamed_weights_load_as_diffusers_wrote_them(gv, tmp_path):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    config = dict(gv.SD15_VAE, block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)
    with torch.device("meta"):
        model = diffusers.AutoencoderKL(**config)
    torch.manual_seed(0)
    gv._write_streamed(model, tmp_path)
    loaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).state_dict()
    fresh = diffusers.AutoencoderKL(**config).state_dict()
    assert list(loaded) == list(fresh)
    for k, v in loaded.items():
        assert v.shape == fresh[k].shape and v.dtype == torch.float32 and torch.isfinite(v).all()
        if k.endswith("norm1.weight") or k.endswith("norm2.weight"):
            assert torch.all(v == 1)                            # initialised as PyTorch initialises the module
        if v.numel() > 1000:
            assert abs(v.std().item() / fresh[k].std().item() - 1) < 0.2, k


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "expected steps >= 1"),
    (["--size", "sd-2"], "invalid choice: 'sd-2'"),
    (["--precision", "int8"], "invalid choice: 'int8'"),
])
def test_bad_arguments_are_refused(gv, argv, message, capsys):
    with pytest.raises(SystemExit):
        gv.parse_args(argv)
    assert message in capsys.readouterr().err
