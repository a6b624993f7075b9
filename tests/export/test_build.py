"""The build directory: manifest round trip, sha256 checks, and a greedy decode stitched by hand from the graphs."""
import json
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from nxc import names
from nxc.config import NextChatConfig
from nxc.manifest import SCHEMA, BuildError, load_manifest
from nxc.runtime.kv_cache import CacheFullError, KVCache
from nxc.specs import graph_specs


def test_build_layout_and_manifest_round_trip(tiny_build, tiny_model):
    model, tok = tiny_model
    m = load_manifest(tiny_build)
    assert m.data["schema"] == SCHEMA
    assert set(m.graphs) == set(names.GRAPHS)
    for g, spec in graph_specs(model.config).items():
        assert m.graph_spec(g) == spec, g                      # the spec survives JSON
        assert m.graph_path(g).is_file()
    assert m.data["tokens"][names.AT] == tok.added_token_ids[names.AT]
    assert m.data["dispatch"]["trigger"] == names.AT
    assert NextChatConfig.from_dict(m.data["config"]) == model.config
    assert np.load(m.path("embeddings.npy")).shape == (model.config.llm.vocab_size, model.config.llm.hidden_size)
    listed = set(m.data["files"])
    on_disk = {p.relative_to(tiny_build).as_posix() for p in tiny_build.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    parity = json.loads((tiny_build / "reports" / "parity.json").read_text())
    assert set(parity) == set(names.GRAPHS) and all(p["ok"] and len(p["checks"]) == 2 for p in parity.values())
    assert all(g["tensorrt_lint"]["ok"] for g in m.graphs.values()), {g: v["tensorrt_lint"]["problems"] for g, v in m.graphs.items()}
    assert not list(tiny_build.parent.glob(".fp32.partial-*"))


@pytest.fixture
def build_copy(tiny_build, tmp_path):
    dst = tmp_path / "build"
    shutil.copytree(tiny_build, dst)
    return dst


def test_tampered_file_fails_sha256_check(build_copy):
    path = build_copy / "graphs" / "loc_heads.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BuildError, match=r"loc_heads\.onnx: sha256 .* does not match the manifest.*re-export"):
        load_manifest(build_copy)


@pytest.mark.parametrize("damage,message", [
    (lambda b: (b / "graphs" / "vision.onnx").unlink(), r"vision\.onnx: missing"),
    (lambda b: (b / "graphs" / "llm.onnx").write_bytes((b / "graphs" / "llm.onnx").read_bytes()[:100]),
     r"llm\.onnx: 100 bytes, the manifest says \d+; the file is truncated"),
    (lambda b: (b / "manifest.json").write_text(json.dumps({**json.loads((b / "manifest.json").read_text()),
                                                             "schema": "nxc-build/0"})),
     r"manifest schema 'nxc-build/0', this nxc reads 'nxc-build/1'"),
    (lambda b: (b / "manifest.json").write_text("{not json"), r"not valid JSON"),
])
def test_damaged_build_is_refused_with_the_file_named(build_copy, damage, message):
    damage(build_copy)
    with pytest.raises(BuildError, match=message):
        load_manifest(build_copy)


def test_manifest_entry_outside_the_build_is_refused(build_copy, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("x")
    data = json.loads((build_copy / "manifest.json").read_text())
    data["files"]["../secret.txt"] = {"sha256": "0" * 64, "bytes": 1}
    (build_copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BuildError, match="points outside the build directory"):
        load_manifest(build_copy)


def test_kv_cache_writes_in_place_and_refuses_overflow():
    c = KVCache(num_layers=1, num_kv_heads=2, head_dim=3, capacity=4)
    rows = np.arange(2 * 2 * 3, dtype=np.float32).reshape(1, 2, 2, 3)
    c.append({names.present_key(0): rows, names.present_value(0): -rows})
    past = c.past()
    assert past[names.past_key(0)].shape == (1, 2, 2, 3) and past[names.past_key(0)].flags["C_CONTIGUOUS"]
    assert np.shares_memory(past[names.past_key(0)], c._buf[names.past_key(0)])      # a view, not a copy
    np.testing.assert_array_equal(past[names.past_value(0)], -rows)
    with pytest.raises(CacheFullError, match="2 positions are cached and 3 more do not fit in the build's context of 4"):
        c.append({names.present_key(0): np.zeros((1, 3, 2, 3), np.float32),
                  names.present_value(0): np.zeros((1, 3, 2, 3), np.float32)})


def test_greedy_decode_stitched_from_graphs_matches_reference(tiny_build, tiny_ckpt_export):
    """20 tokens, with two forced <at> triggers (the loop's feedback path) and a region input box."""
    from nxc.model import processing
    from nxc.model.reference import ReferenceChat

    ref = ReferenceChat.load(tiny_ckpt_export)
    t = ref.token_ids
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    box = [[5.0, 4.0, 30.0, 25.0]]

    def processor(step, logits):          # same rule on both sides: triggers at steps 2 and 9, no early </s>
        logits = logits.copy()
        logits[t.eos] = -1e9
        if step in (2, 9):
            logits[t.at] = 1e9
        return logits

    res = ref.chat(image, "What is [0]?", boxes=box, max_new_tokens=20, logits_processor=processor, iou_threshold=None)
    assert len(res.token_ids) == 20 and res.token_ids.count(t.at) == 2

    m = load_manifest(tiny_build)
    sess = {g: ort.InferenceSession(str(m.graph_path(g)), providers=["CPUExecutionProvider"]) for g in names.GRAPHS}
    cfg = m.data["config"]
    table = np.load(m.path("embeddings.npy"))
    ids = res.prompt_ids
    emb = table[ids][None].copy()
    pixels = processing.clip_pixels(image, m.data["preprocess"]["clip"]["size"]).numpy()
    feats = sess["vision"].run(None, {"pixel_values": pixels})[0]
    start = ids.index(m.data["tokens"][names.IM_START])
    emb[0, start + 1:start + 1 + feats.shape[1]] = feats[0]
    norm_box = processing.normalise_boxes(np.asarray(box, np.float32), *image.size).numpy()
    loc = sess["loc_heads"].run(["loc_embeds"], {"hidden": np.zeros((1, cfg["llm"]["hidden_size"]), np.float32),
                                                 "boxes": norm_box})[0]
    emb[0, [i for i, x in enumerate(ids) if x == t.boxes]] = loc

    llm = cfg["llm"]
    cache = KVCache(num_layers=llm["num_layers"], num_kv_heads=llm["num_kv_heads"],
                    head_dim=llm["hidden_size"] // llm["num_heads"], capacity=m.data["max_context"])
    spec = m.graph_spec(names.GRAPH_LLM)

    def step(x):
        out = dict(zip(spec.output_names, sess["llm"].run(spec.output_names, cache.feeds(x))))
        cache.append(out)
        return out["logits"][0], out["hidden"]

    logits, hidden = step(emb)
    fed, out, boxes = ids[-1], [], []
    while True:
        if fed == t.at:
            box_k, feedback = sess["loc_heads"].run(["box", "feedback"], {"hidden": hidden, "boxes": norm_box})
            boxes.append(box_k[0])
            nxt, x = t.boxes, feedback[None]
        else:
            if len(out) >= 20:
                break
            nxt = int(np.argmax(processor(len(out), logits)))
            x = table[[nxt]][None]
        out.append(nxt)
        if len(out) >= 20 and nxt != t.at:
            break
        logits, hidden = step(x)
        fed = nxt
    assert out == res.token_ids
    np.testing.assert_allclose(np.array(boxes), res.generation.boxes.detach().numpy(), rtol=1e-4, atol=1e-4)


def test_export_cli_rejects_old_opset(capsys):
    from nxc.export.cli import main
    assert main(["--opset", "13", "--out", "unused"]) == 2
    assert "--opset 13 is too old" in capsys.readouterr().err


def test_export_refuses_to_replace_a_non_build_directory(tiny_ckpt_export, tmp_path):
    from nxc.export.exporter import ExportError, ExportOptions, export_build
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists and is not a build directory"):
        export_build(tiny_ckpt_export, out, options=ExportOptions(graphs=("loc_heads",), max_context=64))
    assert (out / "notes.txt").read_text() == "mine"
    assert not list(tmp_path.glob(".precious.partial-*"))


def test_torch_free_modules_do_not_import_torch():
    import subprocess
    import sys
    code = ("import sys; sys.modules['torch'] = None; sys.modules['onnx'] = None; sys.modules['transformers'] = None\n"
            "import nxc.manifest, nxc.specs, nxc.runtime.kv_cache\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert torch  # the test module itself may use torch


def test_export_cli_embedded_fp16_with_progress(tmp_path, capsys):
    """`nxc-export --fp16` on the embedded model: progress per graph, a verified build, fp16 KV cache."""
    from nxc.export.cli import main
    out = tmp_path / "fp16"
    assert main(["--fp16", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for i, g in enumerate(names.GRAPHS, 1):
        assert f"[{i}/5] {g}: exporting" in err
    m = load_manifest(out)
    assert m.data["precision"] == "fp16" and m.data["source"]["checkpoint"] == "embedded:shapes-nextchat"
    assert m.graph_spec("llm").inputs[3].dtype == "float16"
    assert all(g["precision"] == "fp16" for g in m.graphs.values())


def test_graph_with_external_data_outside_the_build_is_refused(build_copy, tmp_path):
    """Even with consistent hashes (a crafted build), a graph may not make the runtime read other files."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from nxc.manifest import write_manifest
    from nxc.runtime.backends import BackendError
    from nxc.runtime.pipeline import Pipeline

    secret = tmp_path / "secret.data"
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    g = helper.make_graph([helper.make_node("MatMul", ["hidden", "w"], ["box"])], "g",
                          [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 4])],
                          [helper.make_tensor_value_info("box", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = build_copy / "graphs" / "loc_heads.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="w.data", size_threshold=0)
    (build_copy / "graphs" / "w.data").rename(secret)
    crafted = onnx.load(str(path), load_external_data=False)
    for e in crafted.graph.initializer[0].external_data:
        if e.key == "location":
            e.value = "../../" + secret.name
    path.write_bytes(crafted.SerializeToString())
    data = json.loads((build_copy / "manifest.json").read_text())
    data.pop("files"), data.pop("schema")
    write_manifest(build_copy, data)                     # hashes now match the crafted file
    pipe = Pipeline.load(build_copy)
    with pytest.raises(BackendError, match="external data points outside the build directory"):
        pipe.runner("loc_heads")
