"""benchmarks/true_size.py's own machinery (the benchmark itself is not run in CI): the per-process peak-RSS
wrapper, the streamed HF safetensors view of the LLaMA, the generated photos and the step arguments."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "true_size.py"


@pytest.fixture(scope="module")
def ts():
    spec = importlib.util.spec_from_file_location("true_size", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_measured_reports_each_process_own_peak(ts, tmp_path):
    big = ts.measured([sys.executable, "-c", "import numpy as np; a = np.ones(400 * 2**20 // 8); print('done')"],
                      tmp_path, "big")
    small = ts.measured([sys.executable, "-c", "print('small')"], tmp_path, "small")
    assert big["ok"] and small["ok"]
    assert big["peak_rss_gb"] >= 0.4
    assert small["peak_rss_gb"] < 0.2           # a fresh wrapper per command: the big one does not leak in
    assert (tmp_path / "logs" / "big.log").read_text().strip() == "done"


def test_measured_records_a_failure_with_its_output(ts, tmp_path):
    rec = ts.measured([sys.executable, "-c", "import sys; print('it broke'); sys.exit(3)"], tmp_path, "bad")
    assert rec["ok"] is False and rec["rc"] == 3
    assert rec["error_tail"] == ["it broke"]
    rec = ts.measured([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
                      tmp_path, "killed")
    assert rec["killed_by_signal"] == 9


def test_hf_view_shards_hold_the_checkpoint_tensors(ts, tmp_path):
    torch = pytest.importorskip("torch")
    from safetensors import safe_open
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(10, 4, generator=g),
               "model.layers.10.mlp.up_proj.weight": torch.randn(6, 4, generator=g).half(),
               "model.layers.2.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
               "model.layers.2.self_attn.rotary_emb.inv_freq": torch.ones(2),
               "model.norm.weight": torch.ones(4), "lm_head.weight": torch.randn(10, 4, generator=g),
               "model.mm_projector.0.weight": torch.randn(4, 4, generator=g)}

    class Lazy:
        def get(self, k):
            return tensors[k]

    keys = ts._llama_keys(list(tensors))
    assert keys == ["model.embed_tokens.weight", "model.layers.2.self_attn.q_proj.weight",
                    "model.layers.10.mlp.up_proj.weight", "model.norm.weight", "lm_head.weight"]
    path = tmp_path / "model.safetensors"
    ts._write_safetensors(path, Lazy(), keys, {k: tuple(tensors[k].shape) for k in keys})
    with safe_open(str(path), framework="pt") as f:
        assert sorted(f.keys()) == sorted(keys)
        for k in keys:
            got = f.get_tensor(k)
            assert got.dtype == torch.float16
            assert torch.equal(got, tensors[k].half())


def test_photo_is_a_deterministic_rgb_image(ts):
    a, b = ts.photo(3, 64, 48), ts.photo(3, 64, 48)
    assert a.size == (64, 48) and a.mode == "RGB"
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.asarray(a).std() > 5                                   # not a flat colour


@pytest.mark.parametrize("argv, message", [
    (["--steps", "make,bake"], "unknown step or precision 'bake'"),
    (["--precisions", "fp8"], "unknown step or precision 'fp8'"),
])
def test_bad_steps_are_refused(ts, argv, message, capsys):
    with pytest.raises(SystemExit):
        ts.parse_args(argv)
    assert message in capsys.readouterr().err


def test_arguments_default_to_the_true_sizes(ts):
    a = ts.parse_args(["--steps", "run,genai"])
    assert (a.llm, a.vision, a.sam, a.dtype) == ("vicuna-7b", "clip-vit-l-336", "vit_h", "fp16")
    assert a.steps == ["run", "genai"] and a.image_size == (1280, 960)


def test_nextgpt_family_defaults_and_steps(ts, capsys):
    a = ts.parse_args(["--family", "nextgpt"])
    assert (a.llm, a.vision, a.projector, a.generator, a.dtype) == ("vicuna-7b", "imagebind-huge", "nextgpt",
                                                                    "sd-1.5", "fp16")
    assert a.steps == ["make", "export"]
    with pytest.raises(SystemExit):
        ts.parse_args(["--family", "nextgpt", "--steps", "make,run"])
    assert "--family nextgpt has the steps make,export" in capsys.readouterr().err


def test_nextgpt_dry_run_makes_and_exports(ts, tmp_path):
    """The NExT-GPT-7B row at tiny sizes: the maker's streamed path (--dtype given) and an fp16 export, each
    measured in its own process."""
    pytest.importorskip("diffusers")
    argv = ["--family", "nextgpt", "--llm", "tiny", "--vision", "tiny", "--projector", "tiny", "--generator", "tiny",
            "--precisions", "fp16", "--max-context", "128", "--work", str(tmp_path / "w"), "--keep"]
    assert ts.main(argv) == 0
    import json
    r = json.loads((tmp_path / "w" / "results.json").read_text())
    assert r["make"]["ok"] and r["export"]["fp16"]["ok"] and r["failed"] == []
    assert r["sizes"]["family"] == "nextgpt" and r["export"]["fp16"]["parity_ok"]["projector"]
    cfg = json.loads((tmp_path / "w" / "ckpt" / "config.json").read_text())
    assert cfg["grounding"] == "generation" and cfg["nxc_maker"]["dtype"] == "fp16"


def _llama_tree():
    spec = importlib.util.spec_from_file_location("llama_cpp_bench", SCRIPT.parent / "llama_cpp_bench.py")
    lc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lc)
    import os
    root = Path(os.environ.get("LLAMA_CPP_DIR") or lc.HOME / f"llama_cpp_python-{lc.VERSION}" / "vendor" / "llama.cpp")
    return root if all((root / "build" / "bin" / t).is_file() for t in lc.TARGETS) else None


def test_llama_step_without_llama_cpp_is_skipped_with_the_reason(ts, tmp_path, monkeypatch):
    """No llama.cpp here (LLAMA_CPP_DIR names nothing): the llama step records why and fails nothing."""
    import json
    monkeypatch.setenv("LLAMA_CPP_DIR", str(tmp_path / "no-llama"))
    (tmp_path / "w" / "ckpt").mkdir(parents=True)
    (tmp_path / "w" / "ckpt" / "config.json").write_text("{}")
    assert ts.main(["--llm", "tiny", "--vision", "tiny", "--sam", "tiny", "--steps", "llama",
                    "--work", str(tmp_path / "w"), "--keep"]) == 0
    r = json.loads((tmp_path / "w" / "results.json").read_text())
    assert "no-llama is not a directory" in r["llama"]["skipped"] and r["failed"] == []


def test_tiny_dry_run_against_llama_cpp(ts, tmp_path):
    """make, int4 / int8 export and runs at tiny size, then llama.cpp Q4_0 / Q8_0 of the same LLaMA at the runs'
    context and prompt length, with the ratios (where a built llama.cpp tree exists)."""
    if _llama_tree() is None:
        pytest.skip("no built llama.cpp tree (LLAMA_CPP_DIR or NXC_LLAMA_CPP_HOME): `python benchmarks/"
                    "llama_cpp_bench.py --build` makes one (about 9 minutes on 2 cores)")
    import json
    argv = ["--llm", "tiny", "--vision", "tiny", "--sam", "tiny", "--precisions", "int8,int4", "--steps",
            "make,export,run,llama", "--calib-images", "2", "--image-size", "96x64", "--decode-steps", "8",
            "--work", str(tmp_path / "w"), "--keep"]
    assert ts.main(argv) == 0
    r = json.loads((tmp_path / "w" / "results.json").read_text())
    lr = r["llama"]
    assert lr["ok"] and r["failed"] == []
    for precision, kind in (("int4", "Q4_0"), ("int8", "Q8_0")):
        q = lr[kind]
        assert q["ok"] and q["type"] == kind and q["decode_tokens_per_s"] > 0 and q["prefill_tokens_per_s"] > 0
        assert q["decode_depth"] == r["run"][precision]["decode"]["context_start"]
        assert q["prefill_tokens"] == r["run"][precision]["prompt_tokens"]
        assert q[f"nxc_{precision}_decode_vs"] > 0
    assert not (tmp_path / "w" / "gguf" / "model-f16.gguf").exists()
