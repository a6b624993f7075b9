"""The build directory: manifest round trip, sha256 checks, and a greedy decode stitched by hand from the graphs."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from nxc import names
from nxc.decode import assemble_prefill, decode_loop
from nxc.manifest import SCHEMA, BuildError, load_manifest
from nxc.runtime.backends.ort import OrtBackend
from nxc.runtime.kv_cache import CacheFullError, KVCache
from nxc.specs import graph_specs


def test_build_layout_and_manifest_round_trip(tiny_build, tiny_model):
    model, tok = tiny_model
    m = load_manifest(tiny_build)
    assert m.schema == SCHEMA
    assert m.to_dict() == json.loads((tiny_build / "manifest.json").read_text())     # typed, nothing lost
    assert set(m.graphs) == set(names.GRAPHS)
    for g, spec in graph_specs(model.config).items():
        assert m.graph_spec(g) == spec, g                      # the spec survives JSON
        assert m.graph_path(g).is_file()
    assert m.token_id(names.AT) == tok.added_token_ids[names.AT]
    assert [(h.trigger, h.emit, h.graph, h.finish) for h in m.heads] == [
        (names.AT, names.BOXES, names.GRAPH_LOC_HEADS, "sam_masks")]
    assert m.config == model.config
    assert np.load(m.path(m.embeddings.file)).shape == m.embeddings.shape == (model.config.llm.vocab_size,
                                                                              model.config.llm.hidden_size)
    listed = set(m.files)
    on_disk = {p.relative_to(tiny_build).as_posix() for p in tiny_build.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk
    parity = json.loads((tiny_build / "reports" / "parity.json").read_text())
    assert set(parity) == set(names.GRAPHS) and all(p["ok"] for p in parity.values())
    # two input shapes per graph; sam_encoder has no dynamic axis, so its second shape would repeat the first
    assert {g: len(p["checks"]) for g, p in parity.items()} == {**{g: 2 for g in names.GRAPHS}, "sam_encoder": 1}
    assert all(g.extra["tensorrt_lint"]["ok"] for g in m.graphs.values()), \
        {g: v.extra["tensorrt_lint"]["problems"] for g, v in m.graphs.items()}
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
                                                             "schema": "nxc-build/9"})),
     r"schema: \"nxc-build/9\" is not a schema this nxc reads \(nxc-build/2\)"),
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


def test_kv_cache_grows_in_place_and_refuses_overflow():
    c = KVCache(num_layers=1, num_kv_heads=2, head_dim=3, capacity=4)
    base = c.address(names.past_key(0), 0)
    assert c.address(names.past_key(0), 2) == base + 2 * 2 * 3 * 4      # row 2 of [1, 4, 2, 3] float32
    feeds = c.step_inputs(np.zeros((1, 2, 8), np.float32))
    assert feeds["attention_mask"].shape == (1, 2) and feeds["position_ids"].tolist() == [[0, 1]]
    c.advance(2)
    assert c.arrays()[names.past_key(0)].shape == (1, 2, 2, 3)
    assert np.shares_memory(c.arrays()[names.past_key(0)], c.arrays()[names.past_key(0)].base)
    assert c.step_inputs(np.zeros((1, 1, 8), np.float32))["position_ids"].tolist() == [[2]]
    with pytest.raises(CacheFullError, match="2 positions are cached and 3 more do not fit in the build's context of 4"):
        c.advance(3)


def test_greedy_decode_stitched_from_graphs_matches_reference(tiny_build, tiny_ckpt_export):
    """20 tokens, with two forced <at> triggers (the loop's feedback path) and a region input box: the exported
    graphs in ONNX Runtime, stitched by the shared prefill assembly and decode loop, give the reference's ids."""
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
    backend = OrtBackend()
    run = {g: backend.load(m.graph_path(g), m.graph_spec(g)) for g in names.GRAPHS}
    table = np.load(m.path("embeddings.npy"))
    ids = res.prompt_ids
    pixels = processing.clip_pixels(image, m.clip.size).numpy()
    norm_box = processing.normalise_boxes(np.asarray(box, np.float32), *image.size).numpy()
    zero_hidden = np.zeros((1, m.config.llm.hidden_size), np.float32)
    emb = assemble_prefill(
        ids, table[ids], image_span=(m.token_id(names.IM_START), m.token_id(names.IM_END), m.prompt.num_image_tokens),
        image_features=lambda: run["vision"].run({"pixel_values": pixels})["image_embeds"][0], slot=t.boxes,
        num_slot_values=1, slot_rows=lambda ks: run["loc_heads"].run({"hidden": zero_hidden, "boxes": norm_box[ks]})["loc_embeds"])

    llm = m.config.llm
    cache = KVCache(num_layers=llm.num_layers, num_kv_heads=llm.num_kv_heads, head_dim=llm.head_dim,
                    capacity=m.max_context)

    def step(token, x):
        out = run["llm"].run_cached(table[[token]][None] if x is None else x, cache)
        return out["logits"][0], out["hidden"]

    boxes = []

    def loc_head(rows):                     # the hiddens of every row fed <at> this step (batch 1: one)
        heads = run["loc_heads"].run({"hidden": np.concatenate(rows), "boxes": norm_box})
        boxes.extend(heads["box"])
        return [(t.boxes, heads["feedback"][i][None, None], None) for i in range(len(rows))]

    logits, hidden = step(None, emb[None])
    out = [tok for tok, _ in decode_loop(logits=logits, hidden=hidden, fed=ids[-1], step=step, heads={t.at: loc_head},
                                         pick=lambda lg, n: int(np.argmax(processor(n, lg))), max_new=20, eos=t.eos)]
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
    assert m.precision == "fp16" and m.source["checkpoint"] == "embedded:shapes-nextchat"
    assert m.graph_spec("llm").inputs[3].dtype == m.kv_cache.dtype == "float16"
    assert all(g.precision == "fp16" for g in m.graphs.values())
    assert [p.name for p in tmp_path.iterdir()] == ["fp16"]          # no scratch, partial or lock left beside it
    assert not (out / ".fp32ref").exists() and (out / "reports" / "accuracy.json").is_file()


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


SMALL = dict(graphs=("loc_heads",), max_context=64, parity=False)


def test_stale_lock_and_scratch_of_a_killed_export_are_cleaned(tiny_ckpt_export, tmp_path, capsys):
    import subprocess
    import sys

    from nxc.export.exporter import ExportOptions, export_build
    out = tmp_path / "fp32"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "fp32.lock").write_text(f"{dead.pid}\n")                    # its nxc-export was killed
    scratch = tmp_path / ".fp32.partial-999999" / ".fp32ref"               # a killed fp16 export's fp32 graphs
    scratch.mkdir(parents=True)
    (scratch / "vision.onnx").write_bytes(b"x" * 100)
    (tmp_path / ".fp32ref-k2j4x0").mkdir()                                 # where nxc 0.1 wrote them
    export_build(tiny_ckpt_export, out, options=ExportOptions(**SMALL))
    assert f"taking over {tmp_path / 'fp32.lock'} (its nxc-export, pid {dead.pid}, is gone)" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["fp32"]
    load_manifest(out)


def test_kill_between_the_swaps_renames_is_recovered(tiny_ckpt_export, unconvertible_ckpt, tmp_path, monkeypatch,
                                                     capsys):
    """out -> .old, then the kill before .partial -> out: the next export puts the previous build back first (here
    one that then fails on its tokenizer, so the restored build is what is left)."""
    from pathlib import Path

    from nxc.export.exporter import ExportError, ExportOptions, export_build
    out = tmp_path / "fp32"
    export_build(tiny_ckpt_export, out, options=ExportOptions(**SMALL))
    before = (out / "manifest.json").read_bytes()
    rename = Path.rename

    def killed_on_the_second_rename(self, target):
        if ".partial-" in self.name:
            raise KeyboardInterrupt
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", killed_on_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        export_build(tiny_ckpt_export, out, options=ExportOptions(**SMALL))
    monkeypatch.undo()
    assert not out.exists() and [p.name.split("-")[0] for p in tmp_path.glob(".fp32.*")] == [".fp32.old"]
    with pytest.raises(ExportError, match="the tokenizer does not convert"):
        export_build(unconvertible_ckpt, out, options=ExportOptions(**SMALL))
    assert "[nxc-export] restored " in capsys.readouterr().err
    assert (out / "manifest.json").read_bytes() == before
    load_manifest(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp32", "unconvertible"]


def test_int8_progress_lines_show_the_lint_of_the_quantized_graphs(tmp_path, capsys):
    """The line per graph gives the TensorRT lint of the graph that ships (the quantized one), as the manifest
    records it: the int8 llm's MatMulNBits is a finding, never "lint ok"."""
    from nxc.export.exporter import ExportOptions, export_build
    out = export_build(None, tmp_path / "int8", options=ExportOptions(precision="int8", calib_samples=2,
                                                                      graphs=("llm", "loc_heads"), parity=False))
    err = capsys.readouterr().err.splitlines()
    m = load_manifest(out)
    for g, entry in m.graphs.items():
        lint = entry.extra["tensorrt_lint"]
        [line] = [x for x in err if x.startswith(f"[nxc-export] {g}: {entry.precision}, ")]
        said = "TensorRT lint ok" if lint["ok"] else f"TensorRT lint: {lint['problem_count']} problem(s): " \
                                                     f"{lint['problems'][0]}"
        assert said in line, (line, lint)
        assert lint["ok"] or not any(g in x and "lint ok" in x for x in err), err
    assert not m.graphs["llm"].extra["tensorrt_lint"]["ok"]
    assert "com.microsoft::MatMulNBits" in next(x for x in err if x.startswith("[nxc-export] llm: int8-weight-only"))
