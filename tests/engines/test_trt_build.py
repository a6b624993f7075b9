"""nxc-build: optimisation profiles from the manifest, the CLI's one-line refusal without TensorRT, and a real
engine build where a GPU and TensorRT exist (skipped, with the reason, elsewhere). No stand-in TensorRT: the build
flow is only tested against the real library."""
import json
import sys

import numpy as np
import pytest

from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, NextChatConfig
from nxc.engines import cli
from nxc.engines.trt_build import engine_folder_name, profile_shapes
from nxc.specs import axis_ranges, graph_specs


@pytest.fixture(scope="module")
def specs():
    cfg = NextChatConfig(llm=LLAMA_SIZES["tinyllama-1.1b"], vision=VISION_SIZES["shapes"], sam=SAM_SIZES["shapes"],
                         mm_hidden_size=VISION_SIZES["shapes"].hidden_size)
    return cfg, graph_specs(cfg)


@pytest.mark.parametrize("max_context,prefill_opt", [(2048, 0), (2048, 2048), (64, 64), (2, 2)])
def test_profile_shapes_are_consistent(specs, max_context, prefill_opt):
    _, graphs = specs
    axes = json.loads(json.dumps(axis_ranges(max_context, prefill_opt=prefill_opt)))      # lists, as in a manifest
    for name, spec in graphs.items():
        prof = profile_shapes(spec, axes)
        assert set(prof) == set(spec.input_names)
        for t in spec.inputs:
            lo, opt, hi = prof[t.name]
            assert len(lo) == len(opt) == len(hi) == len(t.shape)
            for i, d in enumerate(t.shape):
                assert lo[i] <= opt[i] <= hi[i], (name, t.name, i)
                if isinstance(d, int):
                    assert lo[i] == opt[i] == hi[i] == d
    llm = profile_shapes(graphs["llm"], axes)
    past, seq, mask = llm["past_key_values.0.key"], llm["inputs_embeds"], llm["attention_mask"]
    assert past[0][1] == 0                                                    # the prefill: no past
    for k in (0, 1):                                                          # min and opt: total = past + sequence
        assert mask[k][1] == past[k][1] + seq[k][1]
    assert mask[2][1] == min(past[2][1] + seq[2][1], axes["total"][2]) == max_context
    assert all(llm[n][k][1] == past[k][1] for n in llm if n.startswith("past_key_values") for k in range(3))
    for g, inp in (("sam_encoder", "image"), ("sam_decoder", "image_embedding")):
        assert {s[0] for s in profile_shapes(graphs[g], axes)[inp]} == {1}    # SAM runs one image


def test_profile_shapes_refuses_bad_axes(specs):
    _, graphs = specs
    axes = axis_ranges(64)
    with pytest.raises(ValueError, match="detections"):
        profile_shapes(graphs["loc_heads"], {k: v for k, v in axes.items() if k != "detections"})
    with pytest.raises(ValueError, match="batch"):
        profile_shapes(graphs["vision"], {**axes, "batch": [2, 1, 4]})


def test_engine_folder_name_is_the_runtimes():
    assert engine_folder_name("NVIDIA H100 80GB HBM3", "10.3.0") == "NVIDIA_H100_80GB_HBM3-trt10.3.0"


def _one_line_refusal(capsys, argv, code=2):
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_cli_without_tensorrt_says_so_in_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", None)                      # import tensorrt -> ImportError
    err = _one_line_refusal(capsys, [str(tmp_path / "no-such-build")])
    assert err.strip() == cli.no_tensorrt()


@pytest.mark.parametrize("jetson, what, hint", [
    (False, "tensorrt", "pip install 'nxc[trt]'"),
    (True, "tensorrt", "on a Jetson: sudo apt install python3-libnvinfer (JetPack), in a venv made with "
                       "`python3 -m venv --system-site-packages`"),
    (True, "cuda-python", "on a Jetson: pip install 'cuda-python>=12,<13' (JetPack 6's CUDA 12; not nxc[trt], which "
                          "asks pip for tensorrt)"),
])
def test_install_hints_name_jetpack_on_a_jetson(jetson, what, hint):
    from nxc.runtime.backends.trt import install_hint
    assert install_hint(what, jetson=jetson) == hint


# ---- a real engine build: runs where TensorRT and an NVIDIA GPU exist ------------------------------------------

def _tensorrt_or_skip():
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"TensorRT is not importable here ({e}); engines can only be built on an NVIDIA GPU machine")
    from nxc.runtime.backends import BackendError
    from nxc.runtime.backends.trt import gpu_identity
    try:
        gpu_identity()
    except BackendError as e:
        pytest.skip(f"no usable GPU: {e}")


def test_real_engines_match_onnxruntime(tmp_path):
    _tensorrt_or_skip()
    from nxc.export.exporter import ExportOptions, export_build
    from nxc.export.parity import random_inputs
    from nxc.model.writer import make_tiny_checkpoint
    from nxc.runtime.pipeline import Pipeline
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=1)
    build = export_build(ckpt, tmp_path / "build", options=ExportOptions(max_context=64))
    assert cli.main([str(build), "--graphs", "loc_heads", "vision"]) == 0
    trt_pipe, ort_pipe = Pipeline.load(build, backend="tensorrt"), Pipeline.load(build)
    rng = np.random.default_rng(0)
    for graph, tol in (("loc_heads", 1e-3), ("vision", 1e-2)):
        spec = ort_pipe.manifest.graph_spec(graph)
        feeds = random_inputs(spec, {"batch": 1, "detections": 3, "boxes": 2}, rng)
        got, want = trt_pipe.runner(graph).run(feeds), ort_pipe.runner(graph).run(feeds)
        for name in spec.output_names:
            assert got[name].shape == want[name].shape, (graph, name)
            assert float(np.abs(got[name] - want[name]).max()) <= tol, (graph, name)
