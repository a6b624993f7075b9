"""nxc-build and graphs with external data (SAM ViT-H, CLIP ViT-L: over 1 GB): TensorRT parses them from their file
and looks for the data beside it. The check of the manifest runs here; the engine build where TensorRT and a GPU
exist (skipped, with the reason, elsewhere)."""
from types import SimpleNamespace

import numpy as np
import pytest

from nxc.engines.trt_build import external_data_problem
from nxc.manifest_types import GraphEntry
from nxc.specs import GraphSpec


def _manifest(file, external, lint_files=None):
    extra = {"tensorrt_lint": {"ok": True, "problems": [], "problem_count": 0}}
    if lint_files is not None:
        extra["tensorrt_lint"]["external_data"] = {"files": lint_files, "tensors": 1, "bytes": 1, "note": ""}
    entry = GraphEntry(file=file, external_data=tuple(external), precision="fp32", opset=17,
                       spec=GraphSpec("vision", inputs=(), outputs=()), extra=extra)
    return SimpleNamespace(graphs={"vision": entry}, graph_path=lambda g: f"build/{file}")


@pytest.mark.parametrize("file,external,lint_files,problem", [
    ("graphs/vision.onnx", [], None, None),
    ("graphs/vision.onnx", ["graphs/vision.onnx.data"], ["vision.onnx.data"], None),
    ("graphs/vision.onnx", ["graphs/vision.onnx.data"], None, None),    # exported before the lint record
    ("graphs/vision.onnx", ["vision.onnx.data"], None, "is not in the graph's folder graphs/"),
    ("graphs/vision.onnx", ["graphs/vision.onnx.data"], ["other.data"], "external data ['graphs/other.data']"),
    ("graphs/vision.onnx", [], ["vision.onnx.data"], "but the manifest lists []"),
])
def test_external_data_must_sit_beside_the_graph(file, external, lint_files, problem):
    found = external_data_problem(_manifest(file, external, lint_files), "vision")
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found and "re-export" in found


def test_real_engine_from_a_graph_with_external_data(tmp_path, monkeypatch):
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
    from nxc.engines import cli
    from nxc.export import exporter
    from nxc.export.parity import random_inputs
    from nxc.model.writer import make_tiny_checkpoint
    from nxc.runtime.pipeline import Pipeline
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", 10_000)          # the tiny vision graph: weights in a file
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=1)
    build = exporter.export_build(ckpt, tmp_path / "build", options=exporter.ExportOptions(max_context=64))
    ort_pipe = Pipeline.load(build)
    assert ort_pipe.manifest.graphs["vision"].external_data == ("graphs/vision.onnx.data",)
    assert cli.main([str(build), "--graphs", "vision"]) == 0
    trt_pipe = Pipeline.load(build, backend="tensorrt")
    spec = ort_pipe.manifest.graph_spec("vision")
    feeds = random_inputs(spec, {"batch": 1}, np.random.default_rng(0))
    got, want = trt_pipe.runner("vision").run(feeds), ort_pipe.runner("vision").run(feeds)
    assert float(np.abs(got["image_embeds"] - want["image_embeds"]).max()) <= 1e-2
