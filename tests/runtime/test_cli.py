"""nxc-run and nxc-eval on a build directory; backend selection errors."""
import json

import numpy as np
import pytest
from PIL import Image

from nxc.runtime.backends import BackendError, get_backend
from nxc.runtime.cli import main as run_main
from nxc.shapes.data import make_scene


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory):
    scene = make_scene(np.random.default_rng(21), max_objects=2)
    path = tmp_path_factory.mktemp("img") / "scene.png"
    scene.image.save(path)
    return path, scene


def test_nxc_run_prints_reply_table_and_writes_png(embedded_build, scene_png, tmp_path, capsys):
    path, scene = scene_png
    o = scene.objects[0]
    out = tmp_path / "ann.png"
    assert run_main([str(embedded_build), "--image", str(path), "--prompt", f"Where is the {o.colour} {o.shape} in the image?",
                     "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "[0]" in text and "box (x1, y1, x2, y2)" in text and f"wrote {out}" in text
    assert Image.open(out).size == scene.image.size


def test_nxc_run_json_with_region_box(embedded_build, scene_png, capsys):
    path, scene = scene_png
    box = ",".join(str(v) for v in scene.objects[0].box)
    assert run_main([str(embedded_build), "--image", str(path), "--prompt", "What is region [0]?", "--box", box,
                     "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["finish_reason"] == "stop" and scene.objects[0].shape in data["text"]


@pytest.mark.parametrize("args,message", [
    (["--image", "/nonexistent.png", "--prompt", "hi"], "/nonexistent.png: no such file"),
    (["--prompt", "What is [1]?", "--box", "1,2,3,4"], "refers to region 1"),
    (["--prompt", "   "], "the prompt is empty"),
])
def test_nxc_run_errors_are_one_line(embedded_build, scene_png, capsys, args, message):
    path, _ = scene_png
    if "--image" not in args:
        args = ["--image", str(path), *args]
    assert run_main([str(embedded_build), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_nxc_run_rejects_a_malformed_box(embedded_build, scene_png, capsys):
    with pytest.raises(SystemExit):
        run_main([str(embedded_build), "--image", str(scene_png[0]), "--prompt", "x [0]", "--box", "1,2,3"])
    assert "--box expects 4 numbers" in capsys.readouterr().err


def test_nxc_eval_on_build_equals_reference(embedded_build, capsys):
    from nxc.shapes.evaluate import evaluate, reference_chat, runtime_chat
    from nxc.assets import embedded_checkpoint
    a = evaluate(runtime_chat(embedded_build), n_per_task=15, seed=5, progress=False)
    b = evaluate(reference_chat(embedded_checkpoint()), n_per_task=15, seed=5, progress=False)
    a.pop("meta"), b.pop("meta")
    assert a.keys() == b.keys()
    for task in a:
        for k, v in a[task].items():
            assert v == pytest.approx(b[task][k], abs=1e-4), (task, k)   # same ids; IoUs differ in float rounding


def test_unavailable_provider_is_one_line():
    with pytest.raises(BackendError, match="provider CUDAExecutionProvider is not available here"):
        get_backend("onnxruntime", providers=["cuda"])
    with pytest.raises(BackendError, match="unknown backend 'tflite'"):
        get_backend("tflite")


def _gpu_reason():
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed (pip install 'nxc[trt]' on a GPU machine)"
    try:
        from nxc.runtime.backends.trt import gpu_identity
        gpu_identity()
    except BackendError as e:
        return str(e)
    return None


def test_tensorrt_backend_refuses_cleanly_without_engines(embedded_build):
    """Runs unchanged on a GPU machine with TensorRT: a build without engines names the command to run."""
    reason = _gpu_reason()
    if reason:
        with pytest.raises(BackendError):
            get_backend("tensorrt")
        pytest.skip(f"no TensorRT GPU here: {reason}")
    from nxc.runtime.pipeline import Pipeline
    pipe = Pipeline.load(embedded_build, backend="tensorrt")
    with pytest.raises(BackendError, match="nxc-build"):
        pipe.runner("vision")


def test_demo_runs_through_the_runtime(embedded_build, tmp_path, capsys):
    from nxc.demo import main as demo_main
    out = tmp_path / "demo.png"
    assert demo_main(["--build", str(embedded_build), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nxc.runtime on ONNX Runtime CPU" in text and "ASSISTANT : Answer: [0]" in text
    assert "IoU with the drawn" in text and out.is_file()


@pytest.mark.parametrize("info,ok", [
    ({"tensorrt": "10.3.0", "compute_capability": "8.7", "gpu": "Orin"}, True),
    ({"tensorrt": "8.6.2", "compute_capability": "8.7", "gpu": "Orin"}, False),
    ({"tensorrt": "10.3.0", "compute_capability": "9.0", "gpu": "H100"}, False),
])
def test_engines_for_another_tensorrt_or_gpu_are_refused(info, ok, tmp_path):
    from nxc.runtime.backends.trt import engine_mismatch
    why = engine_mismatch(info, tensorrt="10.3.0", gpu={"name": "Orin", "compute_capability": "8.7"},
                          meta=tmp_path / "engine.json", build=tmp_path)
    assert (why is None) == ok
    if not ok:
        assert "engine.json: engines were built for TensorRT" in why and "nxc-build" in why
