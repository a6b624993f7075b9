"""nxc-run and nxc-eval on a build directory; backend selection errors."""
import json
import os
import subprocess
import sys

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


def test_nxc_run_num_beams_equals_the_pipelines_beams(embedded_build, embedded_pipe, scene_png, capsys):
    from PIL import Image
    path, scene = scene_png
    q = "Where is the object in the image?"
    assert run_main([str(embedded_build), "--image", str(path), "--prompt", q, "--json", "--num-beams", "3",
                     "--early-stopping", "true"]) == 0
    data = json.loads(capsys.readouterr().out)
    want = embedded_pipe.chat(Image.open(path), q, num_beams=3, early_stopping=True)
    assert data["text"] == want.text


@pytest.mark.parametrize("args,message", [
    (["--image", "/nonexistent.png", "--prompt", "hi"], "/nonexistent.png: no such file"),
    (["--image", "/dev/null", "--prompt", "hi"], "/dev/null: the file is empty (0 bytes); pass a PNG or JPEG"),
    (["--prompt", "What is [1]?", "--box", "1,2,3,4"],
     "the prompt refers to region 1 in '[1]', but only 1 box(es) were given (valid indices 0..0). Pass one box per "
     'referenced index (nxc-run --box x1,y1,x2,y2; "boxes": [[x1, y1, x2, y2]] in an API request).'),
    (["--prompt", "   "], "the prompt is empty: ask a question, e.g. 'Where is the red circle in the image?'"),
])
def test_nxc_run_errors_are_one_line(embedded_build, scene_png, capsys, args, message):
    path, _ = scene_png
    if "--image" not in args:
        args = ["--image", str(path), *args]
    assert run_main([str(embedded_build), *args]) == 2
    assert capsys.readouterr().err == f"nxc-run: {message}\n"


def usage_error(argv: list[str], capsys) -> str:
    """The line argparse writes after the usage (exit status 2)."""
    with pytest.raises(SystemExit) as e:
        run_main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("flag,value,message", [
    ("--prompt", os.fsdecode(b"Where is \xff?"),            # argv bytes that are not UTF-8 arrive surrogate-escaped
     "is not valid UTF-8 (byte 0xff at character 9); pass the question as UTF-8 text"),
    ("--top-k", "1.5", "expects a whole number >= 0, got '1.5'"),
    ("--top-k", "-2", "expects a whole number >= 0, got '-2'"),
    ("--seed", "x", "expects a whole number >= 0, got 'x'"),
    ("--seed", "-1", "expects a whole number >= 0, got '-1'"),
    ("--max-new-tokens", "inf", "expects a whole number >= 1, got 'inf'"),
    ("--max-new-tokens", "-5", "expects a whole number >= 1, got '-5'"),
    ("--max-new-tokens", "0", "expects a whole number >= 1, got '0'"),
    ("--temperature", "nan", "expects a finite number >= 0, got 'nan'"),
    ("--top-p", "0", "expects a finite number > 0 and <= 1, got '0'"),
    ("--top-p", "1.5", "expects a finite number > 0 and <= 1, got '1.5'"),
    ("--num-beams", "0", "expects a whole number >= 1, got '0'"),
    ("--out", "{tmp}", "{tmp} is a directory; name the image file to write, e.g. {tmp}/annotated.png"),
    ("--out", "{tmp}/annotated",
     "{tmp}/annotated has no extension, and Pillow takes the image format from it; end the name with .png or .jpg"),
    ("--out", "{tmp}/annotated.psd",
     "{tmp}/annotated.psd: Pillow cannot write .psd images; end the name with .png or .jpg"),
    ("--out", "{tmp}/file.txt/annotated.png",
     "{tmp}/file.txt/annotated.png: {tmp}/file.txt is a file, not a directory"),
])
def test_nxc_run_refuses_bad_flags_before_loading_anything(tmp_path, capsys, flag, value, message):
    """No build, no image: the flag is refused while parsing, before the model would run."""
    (tmp_path / "file.txt").write_text("x")
    value, message = value.replace("{tmp}", str(tmp_path)), message.replace("{tmp}", str(tmp_path))
    argv = ["/no/build", "--image", "/no/image.png", "--prompt", "Where is it?", flag, value]
    assert usage_error(argv, capsys) == f"nxc-run: error: argument {flag}: {message}"


def test_nxc_run_reports_an_image_pillow_cannot_write_in_one_line(embedded_build, scene_png, tmp_path, capsys):
    out = tmp_path / "annotated.xbm"                   # XBM is black and white only
    assert run_main([str(embedded_build), "--image", str(scene_png[0]), "--prompt", "Where is the circle?",
                     "--max-new-tokens", "4", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"nxc-run: cannot write {out} (cannot write mode RGB as XBM)\n"


def test_nxc_run_reads_the_image_from_a_pipe(embedded_build, scene_png, capsys):
    """`... | nxc-run build --image /dev/stdin`: the same reply as from the file."""
    path, scene = scene_png
    o = scene.objects[0]
    argv = [str(embedded_build), "--prompt", f"Where is the {o.colour} {o.shape} in the image?", "--json"]
    piped = subprocess.run([sys.executable, "-m", "nxc.runtime.cli", *argv, "--image", "/dev/stdin"],
                           input=path.read_bytes(), capture_output=True, timeout=300)
    assert piped.returncode == 0, piped.stderr.decode()
    assert run_main([*argv, "--image", str(path)]) == 0
    assert json.loads(piped.stdout) == json.loads(capsys.readouterr().out)


def test_nxc_run_rejects_a_malformed_box(embedded_build, scene_png, capsys):
    with pytest.raises(SystemExit):
        run_main([str(embedded_build), "--image", str(scene_png[0]), "--prompt", "x [0]", "--box", "1,2,3"])
    assert "--box expects 4 numbers" in capsys.readouterr().err


def test_nxc_eval_on_build_equals_reference(embedded_build, capsys, export_extra):
    from nxc.shapes.evaluate import evaluate, reference_chat, runtime_chat
    from nxc.assets import embedded_checkpoint
    a = evaluate(runtime_chat(embedded_build).chat, n_per_task=15, seed=5, progress=False)
    b = evaluate(reference_chat(embedded_checkpoint()).chat, n_per_task=15, seed=5, progress=False)
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
