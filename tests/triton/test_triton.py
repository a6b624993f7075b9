"""nxc-triton: the model repository it writes (configs, files, refusals), the request wire format, and a real
tritonserver (pytriton's, Python backend only) streaming grounded answers like Pipeline.chat, with the llm inside
nxc_chat and the other graphs as Triton models reached through BLS."""
import json
import subprocess
import sys

import httpx
import numpy as np
import pytest
from triton_local import b64_png

from nxc import names
from nxc.manifest import load_manifest
from nxc.serve import rle
from nxc.shapes.data import make_scene
from nxc.triton import chat as chat_wire
from nxc.triton.cli import main as triton_main
from nxc.triton.repo import RepoError, chat_config, graph_config, models, write_repository

GRAPH_MODELS = sorted([*names.GRAPHS, "nxc_chat"])


@pytest.fixture(scope="module")
def scene():
    return make_scene(np.random.default_rng(3))


@pytest.fixture(scope="module")
def spec(embedded_build):
    return load_manifest(embedded_build).graph_spec(names.GRAPH_LLM)


# -- configs -----------------------------------------------------------------------------------------------------
def test_graph_config_has_the_manifest_names_dtypes_and_dims(spec):
    text = graph_config(spec, variant="ngc")
    assert text.startswith('name: "llm"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 0\n')
    h = spec.inputs[0].shape[-1]
    assert f'{{ name: "inputs_embeds" data_type: TYPE_FP32 dims: [ -1, -1, {h} ] }}' in text
    assert '{ name: "attention_mask" data_type: TYPE_INT64 dims: [ -1, -1 ] }' in text
    kv = spec.inputs[3].shape
    assert f'{{ name: "past_key_values.0.key" data_type: TYPE_FP32 dims: [ -1, -1, {kv[2]}, {kv[3]} ] }}' in text
    assert all(f'name: "{n}"' in text for n in spec.input_names + spec.output_names)
    assert "instance_group [ { kind: KIND_GPU count: 1 } ]" in text


@pytest.mark.parametrize("variant,backend,head,kind", [
    ("ngc", "tensorrt", 'platform: "tensorrt_plan"', "KIND_GPU"),
    ("python", "onnxruntime", 'backend: "python"', "KIND_CPU"),
])
def test_graph_config_variants(spec, variant, backend, head, kind):
    text = graph_config(spec, variant=variant, backend=backend, instances=2)
    assert head in text and f"instance_group [ {{ kind: {kind} count: 2 }} ]" in text


def test_chat_config_is_decoupled_with_optional_inputs():
    text = chat_config(variant="ngc", params={"in_process": "llm"})
    assert 'name: "nxc_chat"\nbackend: "python"\n' in text and "model_transaction_policy { decoupled: true }" in text
    assert '{ name: "prompt" data_type: TYPE_STRING dims: [ 1 ] },' in text
    assert '{ name: "max_new_tokens" data_type: TYPE_INT32 dims: [ 1 ] optional: true }' in text
    assert '{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] optional: true }' in text
    assert '{ name: "event" data_type: TYPE_STRING dims: [ 1 ] }' in text
    assert 'parameters { key: "in_process" value: { string_value: "llm" } }' in text


# -- repositories ------------------------------------------------------------------------------------------------
def test_ngc_repository(embedded_build, tmp_path):
    repo = write_repository(embedded_build, tmp_path / "repo")
    assert models(repo) == GRAPH_MODELS
    m = load_manifest(embedded_build)
    for g in names.GRAPHS:
        assert sorted(p.name for p in (repo / g / "1").iterdir()) == ["model.onnx"]
        assert (repo / g / "1" / "model.onnx").read_bytes() == m.graph_path(g).read_bytes()
    chat = (repo / "nxc_chat" / "config.pbtxt").read_text()
    assert 'key: "providers" value: { string_value: "cuda" }' in chat and "KIND_GPU" in chat
    load_manifest(repo / "nxc_chat" / "1" / "build")              # a complete build: every file and hash
    assert "import triton_python_backend_utils" in (repo / "nxc_chat" / "1" / "model.py").read_text()
    assert not list(tmp_path.glob(".repo.*"))                      # no partial folder left behind


def test_python_repository_runs_graphs_in_python_models(python_repo):
    assert models(python_repo) == GRAPH_MODELS
    for g in names.GRAPHS:
        assert 'backend: "python"' in (python_repo / g / "config.pbtxt").read_text()
        assert "OrtBackend" in (python_repo / g / "1" / "model.py").read_text()
    assert 'key: "providers" value: { string_value: "cpu" }' in (python_repo / "nxc_chat" / "config.pbtxt").read_text()


def test_refuses_a_non_empty_repo_unless_forced(embedded_build, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "keep.txt").write_text("mine")
    with pytest.raises(RepoError, match="not empty; choose another folder or pass --force"):
        write_repository(embedded_build, repo)
    assert (repo / "keep.txt").read_text() == "mine"
    write_repository(embedded_build, repo, force=True)
    assert models(repo) == GRAPH_MODELS and not (repo / "keep.txt").exists()


def test_tensorrt_repository_takes_plans_from_an_engine_folder(embedded_build, tmp_path):
    engines = tmp_path / "engines" / "Fake_GPU-trt10.0"
    engines.mkdir(parents=True)
    (engines / "engine.json").write_text("{}")
    for g in names.GRAPHS:
        (engines / f"{g}.plan").write_bytes(g.encode())
    repo = write_repository(embedded_build, tmp_path / "repo", backend="tensorrt", engines=engines)
    for g in names.GRAPHS:
        assert sorted(p.name for p in (repo / g / "1").iterdir()) == ["model.plan"]
        assert (repo / g / "1" / "model.plan").read_bytes() == g.encode()
    chat = (repo / "nxc_chat" / "config.pbtxt").read_text()
    assert 'key: "backend" value: { string_value: "tensorrt" }' in chat
    assert 'key: "engines" value: { string_value: "Fake_GPU-trt10.0" }' in chat
    assert (repo / "nxc_chat" / "1" / "build" / "engines" / "Fake_GPU-trt10.0" / "llm.plan").is_file()
    (engines / "vision.plan").unlink()
    with pytest.raises(RepoError, match="vision.plan: missing; build it with `nxc-build"):
        write_repository(embedded_build, tmp_path / "repo2", backend="tensorrt", engines=engines)


def test_nxc_triton_never_imports_torch():
    code = ("import sys, nxc.triton.repo, nxc.triton.chat, nxc.triton.bls, nxc.triton.cli; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("kwargs,message", [
    ({"variant": "docker"}, "unknown variant 'docker'; choose one of ngc, python"),
    ({"variant": "python", "backend": "tensorrt"}, "--backend tensorrt is for --variant ngc"),
    ({"backend": "tensorrt"}, "--backend tensorrt needs --engines DIR"),
    ({"engines": "somewhere"}, "--engines is for --backend tensorrt"),
    ({"instances": 0}, "instances must be at least 1"),
])
def test_repository_errors(embedded_build, tmp_path, kwargs, message):
    with pytest.raises(RepoError, match=message):
        write_repository(embedded_build, tmp_path / "repo", **kwargs)
    assert not (tmp_path / "repo").exists()


def test_cli_writes_and_prints_the_docker_command(embedded_build, tmp_path, capsys):
    assert triton_main([str(embedded_build), str(tmp_path / "repo")]) == 0
    out = capsys.readouterr().out
    assert "nvcr.io/nvidia/tritonserver:" in out and "--model-repository=/models" in out and "generate_stream" in out
    assert triton_main([str(embedded_build), str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nxc-triton: ") and err.count("\n") == 1 and "--force" in err
    assert triton_main([str(tmp_path / "nowhere"), str(tmp_path / "r2")]) == 2
    assert "no such build directory" in capsys.readouterr().err


def test_nxc_export_triton_writes_the_repository(embedded_build, tmp_path, monkeypatch, capsys):
    import nxc.export.exporter as exporter
    from nxc.export.cli import main as export_main
    monkeypatch.setattr(exporter, "export_build", lambda *a, **k: embedded_build)   # the export is tested elsewhere
    assert export_main(["--out", str(tmp_path / "b"), "--triton", str(tmp_path / "repo")]) == 0
    assert models(tmp_path / "repo") == GRAPH_MODELS
    assert export_main(["--out", str(tmp_path / "b"), "--triton", str(tmp_path / "repo")]) == 2
    assert "is not empty" in capsys.readouterr().err


# -- the wire format ---------------------------------------------------------------------------------------------
def _getter(**values):
    return lambda name: None if name not in values else np.array([values[name]], dtype=object if isinstance(
        values[name], (str, bytes)) else None)


@pytest.mark.parametrize("values,message", [
    ({"image": "x"}, "input 'prompt' is required"),
    ({"prompt": "hi", "image": "not base64!"}, "image: not base64"),
    ({"prompt": "hi", "image": "aGVsbG8="}, "is not an image Pillow can read"),
    ({"prompt": b"\xff", "image": "aGVsbG8="}, "input 'prompt' is not UTF-8 text"),
    ({"prompt": "hi", "image": "IMAGE", "boxes": "[[1, 2"}, "boxes must be JSON"),
])
def test_request_errors_say_what_is_wrong(scene, values, message):
    values = {k: b64_png(scene.image) if v == "IMAGE" else v for k, v in values.items()}
    with pytest.raises(chat_wire.REQUEST_ERRORS, match=message):
        chat_wire.decode_request(_getter(**values))


def test_request_numbers_and_boxes(scene):
    image, prompt, kwargs = chat_wire.decode_request(_getter(
        prompt="What is [0]?", image="data:image/png;base64," + b64_png(scene.image), boxes="[[1, 2, 30, 40]]",
        max_new_tokens=np.int32(7), temperature=np.float32(0.5), seed=np.int64(3)))
    assert image.size == scene.image.size and prompt == "What is [0]?"
    assert kwargs == {"boxes": [[1, 2, 30, 40]], "max_new_tokens": 7, "temperature": 0.5, "seed": 3}


# -- a real tritonserver -----------------------------------------------------------------------------------------
def stream(server, body: dict) -> tuple[int, list[dict], list[str]]:
    """POST generate_stream; (status, events, error messages) from the SSE `data:` lines."""
    events, errors = [], []
    with httpx.stream("POST", f"{server.url}/v2/models/nxc_chat/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if "error" in data:
                    errors.append(data["error"])
                else:
                    events.append(json.loads(data["event"]))
    return r.status_code, events, errors


BLS_GRAPHS = (names.GRAPH_VISION, names.GRAPH_LOC_HEADS, names.GRAPH_SAM_ENCODER, names.GRAPH_SAM_DECODER)


def model_stats(server, model: str) -> dict:
    r = httpx.get(f"{server.url}/v2/models/{model}/stats", timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["model_stats"][0]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


@pytest.mark.parametrize("prompt", ["Where is the {phrase} in the image?",
                                    "Can you describe the image and include object locations?"])
def test_triton_streams_what_pipeline_chat_answers(triton, embedded_pipe, scene, prompt):
    prompt = prompt.format(phrase=scene.objects[0].phrase)
    status, events, errors = stream(triton, {"prompt": prompt, "image": b64_png(scene.image)})
    ref = embedded_pipe.chat(scene.image, prompt)
    assert status == 200 and not errors, errors
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and kinds.count("done") == 1 and "box" in kinds
    done = events[-1]
    assert [e["id"] for e in events if e["type"] == "token"] == done["token_ids"] == ref.token_ids
    assert done["text"] == ref.text and done["finish_reason"] == ref.finish_reason
    boxes = [e for e in events if e["type"] == "box"]
    assert len(boxes) == len(done["grounding"]) == len(ref.detections)
    for ev, g, d in zip(boxes, done["grounding"], ref.detections, strict=True):
        assert ev["index"] == g["index"] and ev["phrase"] == g["phrase"] == d.phrase
        np.testing.assert_allclose(ev["box_norm"], d.box_norm, atol=1e-3)
        np.testing.assert_allclose(g["box"], d.box, atol=1e-3 * max(scene.image.size))
        assert iou(rle.decode(g["mask"]), d.mask) >= 0.99


def test_concurrent_triton_streams_decode_together_and_equal_pipeline_chat(triton, embedded_pipe):
    """nxc_chat's scheduler (max_batch 8 in the python variant): 6 requests at once, each the Pipeline's answer."""
    from concurrent.futures import ThreadPoolExecutor
    from nxc.shapes.data import make_scene
    scenes = [make_scene(np.random.default_rng(40 + k)) for k in range(6)]
    prompts = [f"Where is the {s.objects[0].phrase} in the image?" if k % 2 else "Describe the image with locations."
               for k, s in enumerate(scenes)]
    with ThreadPoolExecutor(6) as pool:
        got = list(pool.map(lambda k: stream(triton, {"prompt": prompts[k], "image": b64_png(scenes[k].image),
                                                      "max_new_tokens": 40}), range(6)))
    for k, (status, events, errors) in enumerate(got):
        assert status == 200 and not errors, errors
        ref = embedded_pipe.chat(scenes[k].image, prompts[k], max_new_tokens=40)
        assert events[-1]["token_ids"] == ref.token_ids, k
        assert len(events[-1]["grounding"]) == len(ref.detections)


def test_triton_region_input(triton, embedded_pipe, scene):
    box = [float(v) for v in scene.objects[0].box]
    status, events, errors = stream(triton, {"prompt": "What is region [0]?", "image": b64_png(scene.image),
                                             "boxes": json.dumps([box]), "max_new_tokens": 24})
    ref = embedded_pipe.chat(scene.image, "What is region [0]?", boxes=[box], max_new_tokens=24)
    assert status == 200 and not errors and events[-1]["token_ids"] == ref.token_ids


@pytest.mark.parametrize("body,message", [
    ({"prompt": "Where is it?", "image": "bm90IGFuIGltYWdl"}, "is not an image Pillow can read"),
    ({"prompt": "What is [1]?", "boxes": "[[1, 2, 30, 40]]"}, "region 1"),
])
def test_triton_bad_request_is_an_error_and_the_server_keeps_serving(triton, scene, body, message):
    body = {"image": b64_png(scene.image), **body}
    status, events, errors = stream(triton, body)
    assert status == 400 and not events and len(errors) == 1 and message in errors[0]
    status, events, errors = stream(triton, {"prompt": "Describe the image.", "image": b64_png(scene.image),
                                             "max_new_tokens": 3})
    assert status == 200 and not errors and events[-1]["type"] == "done" and events[-1]["finish_reason"] == "length"


def test_llm_runs_inside_nxc_chat_and_the_other_graphs_are_triton_models(triton, scene):
    """The KV cache never leaves nxc_chat: the llm model is not even loaded; each other graph ran as its own model."""
    before = {g: model_stats(triton, g)["inference_count"] for g in BLS_GRAPHS}
    status, events, errors = stream(triton, {"prompt": f"Where is the {scene.objects[0].phrase} in the image?",
                                             "image": b64_png(scene.image)})
    assert status == 200 and not errors and any(e["type"] == "box" for e in events)
    for g in BLS_GRAPHS:
        assert model_stats(triton, g)["inference_count"] > before[g], g
    assert httpx.get(f"{triton.url}/v2/models/{names.GRAPH_LLM}/ready", timeout=10).status_code != 200


def test_a_graph_model_that_is_down_is_named_in_the_error(triton, scene):
    unload = httpx.post(f"{triton.url}/v2/repository/models/{names.GRAPH_VISION}/unload", json={}, timeout=60)
    assert unload.status_code == 200, unload.text
    try:
        status, events, errors = stream(triton, {"prompt": "Describe the image.", "image": b64_png(scene.image)})
        assert status >= 400 and not events and len(errors) == 1
        assert f"Triton model '{names.GRAPH_VISION}' failed" in errors[0]
    finally:
        load = httpx.post(f"{triton.url}/v2/repository/models/{names.GRAPH_VISION}/load", json={}, timeout=120)
        assert load.status_code == 200, load.text
    status, events, errors = stream(triton, {"prompt": "Describe the image.", "image": b64_png(scene.image),
                                             "max_new_tokens": 3})
    assert status == 200 and not errors and events[-1]["type"] == "done"


def test_refuses_a_retrieval_build_in_one_line(retrieval_build, tmp_path):
    with pytest.raises(RepoError, match="a retrieval .ChatRex-style. build; nxc-triton writes NExT-Chat's repository "
                                        "only. Serve it with nxc-serve"):
        write_repository(retrieval_build, tmp_path / "repo")


def test_refuses_a_drawing_build_in_one_line(drawing_build, tmp_path, capsys):
    with pytest.raises(RepoError, match="a build that draws .signal tokens and a generator, NExT-GPT-style.; "
                                        "nxc-triton writes NExT-Chat's repository only. Serve it with nxc-serve$"):
        write_repository(drawing_build[0], tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    from nxc.triton.cli import main
    assert main([str(drawing_build[0]), str(tmp_path / "repo")]) != 0
    err = capsys.readouterr().err
    assert "a build that draws" in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_refuses_a_build_that_calls_modules_in_one_line(module_build, tmp_path):
    with pytest.raises(RepoError, match=r"a build whose replies call modules \(VITRON-style: B, E\); nxc-triton writes "
                                        "NExT-Chat's repository only. Serve it with nxc-serve$"):
        write_repository(module_build, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
