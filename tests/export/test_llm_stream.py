"""The streamed llm export (issue 17): the graph written from the checkpoint one tensor at a time equals the graph
torch traces from LlmGraph, at every precision, through ONNX Runtime and through the runtime's greedy decoding; its
piecewise parity check passes on correct weights and refuses each planted mapping mistake."""
import json
import re
import shutil

import numpy as np
import onnxruntime as ort
import pytest
import torch

from nxc.export.exporter import ExportError, ExportOptions, export_build, export_graph
from nxc.export.llm import LlmGraph
from nxc.export.llm_check import ReferenceWeights, check_llm, fake_quantize
from nxc.export.llm_writer import ModelWeights, write_llm_graph
from nxc.export.parity import SHAPES, random_inputs
from nxc.specs import graph_specs

PRECISIONS = ("fp32", "fp16", "int8", "int4")


@pytest.fixture(scope="module")
def embedded():
    from nxc.assets import embedded_checkpoint
    from nxc.model.checkpoint import load_nextchat
    return load_nextchat(embedded_checkpoint())


def _traced(model, precision, path):
    """The oracle: LlmGraph traced by torch.onnx.export (and, for int8 / int4, ONNX Runtime's MatMulNBitsQuantizer
    over the whole traced fp32 graph, as nxc did before the writer)."""
    import copy

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer
    m = copy.deepcopy(model)
    spec = graph_specs(m.config, kv_dtype="float16" if precision == "fp16" else "float32")["llm"]
    if precision == "fp16":
        from nxc.export.fp16 import to_fp16
        m = to_fp16(m)
    traced = path.parent / f"traced-{precision}-fp.onnx"
    export_graph(LlmGraph(m).eval(), spec, m.config, traced, ExportOptions(precision="fp16" if precision == "fp16"
                                                                             else "fp32"))
    if precision in ("int8", "int4"):
        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4,
                                           bits=8 if precision == "int8" else 4)
        q = MatMulNBitsQuantizer(onnx.load(str(traced)), algo_config=cfg)
        q.process()
        q.model.save_model_to_file(str(path), use_external_data_format=False)
    else:
        shutil.move(traced, path)
    return spec


@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_graph_equals_traced_graph(embedded, tmp_path, precision):
    model, _ = embedded
    spec = _traced(model, precision, tmp_path / "traced.onnx")
    write_llm_graph(ModelWeights(model.llm), model.config.llm, tmp_path / "streamed.onnx", spec, precision=precision)
    a = ort.InferenceSession(str(tmp_path / "traced.onnx"), providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(tmp_path / "streamed.onnx"), providers=["CPUExecutionProvider"])
    kv = np.float16 if precision == "fp16" else np.float32
    for i, axes in enumerate(SHAPES):
        feeds = random_inputs(spec, axes, np.random.default_rng(i))
        feeds = {k: v.astype(kv) if k.startswith("past_") else v for k, v in feeds.items()}
        for name, x, y in zip(spec.output_names, a.run(None, feeds), b.run(None, feeds)):
            scale = max(1.0, float(np.abs(x).max()))
            assert x.shape == y.shape and x.dtype == y.dtype, name
            np.testing.assert_allclose(y.astype(np.float64), x, rtol=0, atol=1e-5 * scale, err_msg=name)


def _swap_llm(build, graph_path):
    """The build with its llm graph replaced by `graph_path` (manifest rewritten so its hashes hold)."""
    from nxc.manifest import write_manifest
    shutil.copy(graph_path, build / "graphs" / "llm.onnx")
    body = json.loads((build / "manifest.json").read_text())
    body.pop("schema"), body.pop("files")
    (build / "manifest.json").unlink()
    write_manifest(build, body)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_streamed_build_decodes_the_traced_builds_ids(embedded, tmp_path, precision):
    """Greedy ids through the runtime: the exported (streamed) build and the same build with the traced llm."""
    from nxc.runtime.pipeline import Pipeline
    from nxc.shapes.data import make_scene
    model, _ = embedded
    streamed = export_build(None, tmp_path / "streamed", options=ExportOptions(
        precision=precision, calib_samples=2, graphs=("vision", "llm", "loc_heads")))
    traced = tmp_path / "traced"
    shutil.copytree(streamed, traced)
    _traced(model, precision, tmp_path / "traced.onnx")
    _swap_llm(traced, tmp_path / "traced.onnx")
    a, b = Pipeline.load(streamed), Pipeline.load(traced)
    rng = np.random.default_rng(3)
    prompts = ["Where is the red circle in the image?", "Can you describe the image and include object locations?"]
    grounded = 0
    for k in range(4):
        image = make_scene(rng).image
        ra, rb = a.chat(image, prompts[k % 2]), b.chat(image, prompts[k % 2])
        assert ra.token_ids == rb.token_ids, (k, ra.raw_text, rb.raw_text)
        grounded += len(ra.detections)
    assert grounded > 0                    # the trigger path (box head fed back) ran


@pytest.mark.parametrize("precision", ("fp32", "int4"))
def test_graph_run_layer_by_layer_equals_the_whole_graph(embedded, tmp_path, precision):
    """Cut into one-layer pieces (how the check runs a 7B graph), the written graph gives the whole graph's outputs,
    and the check passes with every layer compared."""
    from nxc.export.llm_check import run_layers
    model, _ = embedded
    spec = graph_specs(model.config)["llm"]
    write_llm_graph(ModelWeights(model.llm), model.config.llm, tmp_path / "llm.onnx", spec, precision=precision)
    feeds = random_inputs(spec, SHAPES[1], np.random.default_rng(0))
    whole = ort.InferenceSession(str(tmp_path / "llm.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    logs = []
    chained, _ = run_layers(tmp_path / "llm.onnx", model.config.llm.num_layers, {"r": feeds}, log=logs.append)
    for name, x in zip(spec.output_names, whole):
        np.testing.assert_allclose(chained["r"][name], x, rtol=1e-5, atol=1e-5, err_msg=name)
    assert len(logs) == model.config.llm.num_layers and not list(tmp_path.glob(".llm.piece*"))
    report = check_llm(tmp_path / "llm.onnx", ReferenceWeights.from_module(model.llm, precision=precision),
                       model.config.llm, precision=precision)
    assert report["ok"], report
    L = model.config.llm.num_layers
    assert all(len(c["rel_l2"]) == 2 + 2 * L + L - 1 for c in report["checks"])   # logits, hidden, K, V, h per layer


def test_fake_quantize_is_what_matmulnbits_computes():
    """The check's quantized reference weights: x @ fake_quantize(W).T equals MatMulNBits at accuracy_level 0."""
    from onnx import TensorProto, helper

    from nxc.export.llm_writer import _DataFile, _Graph, _matmul, LlmPrecision
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, 96)).astype(np.float32)            # [N, K]
    x = rng.standard_normal((3, 96)).astype(np.float32)
    for bits, prec in ((4, "int4"), (8, "int8")):
        import tempfile
        from pathlib import Path
        with tempfile.TemporaryDirectory() as d:
            data = _DataFile(Path(d) / "m.onnx.data")
            g = _Graph(data)
            y = _matmul(g, "x", w.T, "w", LlmPrecision(prec))
            data.close()
            node = g.nodes[-1]
            del node.attribute[[a.name for a in node.attribute].index("accuracy_level")]
            graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 96])],
                                      [helper.make_tensor_value_info(y, TensorProto.FLOAT, None)], initializer=g.inits)
            m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                        helper.make_opsetid("com.microsoft", 1)])
            import onnx
            onnx.save_model(m, str(Path(d) / "m.onnx"))
            got = ort.InferenceSession(str(Path(d) / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        np.testing.assert_allclose(got, x @ fake_quantize(w, bits).T, rtol=1e-4, atol=1e-4)
        assert np.abs(fake_quantize(w, bits) - w).max() > 0                      # it really quantized


# -- planted mistakes: the export refuses each one ----------------------------------------------------------------
@pytest.fixture(scope="module")
def mha_ckpt(tmp_path_factory):
    """A small multi-head (no GQA, as NExT-Chat-7B) NExT-Chat in four .bin shards, and a second one (another seed)
    with the same config: a wrong shard's source."""
    from dataclasses import replace

    from nxc.config import LLAMA_SIZES
    from nxc.model.writer import make_tiny_checkpoint, tiny_config
    root = tmp_path_factory.mktemp("mha")
    base = make_tiny_checkpoint(root / "probe", seed=0)
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    cfg = tiny_config(vocab)
    cfg = replace(cfg, llm=replace(LLAMA_SIZES["tiny"], vocab_size=vocab, num_layers=4, num_kv_heads=4))
    a = make_tiny_checkpoint(root / "a", seed=0, config=cfg, shard_bytes=150_000)
    b = make_tiny_checkpoint(root / "b", seed=5, config=cfg, shard_bytes=150_000)
    return a, b


def _plant(monkeypatch, mistake, ckpt, other):
    from nxc.export import llm_writer
    from nxc.model.lazy import LazyCheckpoint
    names = llm_writer.llama_weight_names
    if mistake == "swapped q/k":
        monkeypatch.setattr(llm_writer, "llama_weight_names",
                            lambda i: {**names(i), "q": names(i)["k"], "k": names(i)["q"]} if i == 3 else names(i))
    elif mistake == "swapped gate/up":
        monkeypatch.setattr(llm_writer, "llama_weight_names",                # layer 1's MLP: silu(up) * gate
                            lambda i: {**names(i), "gate": names(i)["up"], "up": names(i)["gate"]} if i == 1
                            else names(i))
    elif mistake == "layers out of order":
        monkeypatch.setattr(llm_writer, "llama_weight_names", lambda i: names({2: 3, 3: 2}.get(i, i)))
    elif mistake == "transposed matrix":
        get = llm_writer._Weights.get
        monkeypatch.setattr(llm_writer._Weights, "get",
                            lambda self, k, s: get(self, k, s).T.copy() if k == names(2)["o"] else get(self, k, s))
    elif mistake == "wrong shard":
        lazy_other = LazyCheckpoint(other)
        index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())["weight_map"]
        last = index[names(3)["o"]]                         # the shard of layer 3's o_proj (and more)
        real = LazyCheckpoint.get
        monkeypatch.setattr(LazyCheckpoint, "get", lambda self, k: lazy_other.get(k)
                            if self.path == ckpt and self.shard_of(k).name == last else real(self, k))


MISTAKES = ("swapped q/k", "swapped gate/up", "layers out of order", "transposed matrix", "wrong shard")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_mha_checkpoint_exports_cleanly(mha_ckpt, tmp_path, precision):
    """A correct build passes, every layer's K, V, output and both branches compared, far inside the tolerance
    (int8 / int4 too: their pieces run the build's blocks in float arithmetic)."""
    from nxc.export.llm_check import TOLERANCE
    a, _ = mha_ckpt
    out = export_build(a, tmp_path / precision, options=ExportOptions(precision=precision, graphs=("llm",)))
    parity = json.loads((out / "reports" / "parity.json").read_text())["llm"]
    assert parity["ok"] and [c["run"] for c in parity["checks"]] == ["prefill", "decode"]
    for c in parity["checks"]:
        assert len(c["rel_l2"]) == 2 + 2 * 4 + 3                                 # logits, hidden, every K, V, h
        assert sorted(c["branch_rel_l2"]) == sorted(f"layer {i} {b} output" for i in range(4)
                                                    for b in ("attention", "mlp"))
        assert max(*c["rel_l2"].values(), *c["branch_rel_l2"].values()) < TOLERANCE[precision] / 10


# the layer (and what in it) each planted mistake must be refused for: the worst output the refusal names
WHERE = {"swapped q/k": r"'present\.3\.key'", "swapped gate/up": r"'layer 1 mlp output'",
         "layers out of order": r"'(present\.[23]\.(key|value)|h\.[34]|layer [23] (attention|mlp) output)'",
         "transposed matrix": r"'layer 2 attention output'",              # the layer whose o_proj was planted
         "wrong shard": r"'"}


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("mistake", MISTAKES)
def test_planted_mapping_mistake_is_refused(mha_ckpt, tmp_path, monkeypatch, capsys, mistake, precision):
    a, b = mha_ckpt
    _plant(monkeypatch, mistake, a, b)
    with pytest.raises(ExportError, match="does not match transformers' LLaMA layers") as e:
        export_build(a, tmp_path / "out", options=ExportOptions(precision=precision, graphs=("llm",)))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert re.search(WHERE[mistake], str(e.value)) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_broken_branch_shows_under_a_large_residual_stream(embedded, tmp_path, precision):
    """Embeddings 1000x the tiny model's (as a 7B's few huge residual values make its stream far larger than what a
    layer adds): a correct build passes at every precision, and one layer's gate and up swapped is refused by that
    layer's MLP output, where its whole output (h.2) moves by less than the fp16 tolerance."""
    import copy

    from nxc.export.llm_check import TOLERANCE
    model, _ = embedded
    llm = copy.deepcopy(model.llm)
    with torch.no_grad():
        llm.model.embed_tokens.weight.mul_(1000)
    spec = graph_specs(model.config, kv_dtype="float16" if precision == "fp16" else "float32")["llm"]
    kv = np.float16 if precision == "fp16" else np.float32
    swapped = ModelWeights(llm)
    gate, up = "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"
    swapped._sd[gate], swapped._sd[up] = swapped._sd[up], swapped._sd[gate]
    for weights, ok in ((ModelWeights(llm), True), (swapped, False)):
        write_llm_graph(weights, model.config.llm, tmp_path / "llm.onnx", spec, precision=precision)
        report = check_llm(tmp_path / "llm.onnx", ReferenceWeights.from_module(llm, precision=precision),
                           model.config.llm, precision=precision, kv_dtype=kv)
        assert report["ok"] is ok, report
        if not ok:
            for c in report["checks"]:
                assert c["worst"] == "layer 1 mlp output" and c["worst_rel_l2"] > 0.3, c
                assert c["rel_l2"]["h.2"] < 1e-2                      # the whole hidden alone would not show it


@pytest.mark.parametrize("precision", ("int8", "int4"))
def test_block_size_reaches_the_graph_and_its_check(mha_ckpt, tmp_path, precision):
    """nxc-export --block-size 64: every MatMulNBits has block_size 64 and half the scales of blocks of
    32; the llm check's reference quantizes with the same blocks, so the build passes far inside the tolerance (a
    reference left at 32 would be off by the blocks' difference). A size MatMulNBits does not take is refused."""
    import onnx

    from nxc.export.llm_check import TOLERANCE
    from nxc.export.options import check_options
    a, _ = mha_ckpt
    sizes = {}
    for block in (32, 64):
        out = export_build(a, tmp_path / f"b{block}", options=ExportOptions(precision=precision, graphs=("llm",),
                                                                           block_size=block))
        parity = json.loads((out / "reports" / "parity.json").read_text())["llm"]
        assert parity["ok"] and max(v for c in parity["checks"] for v in c["rel_l2"].values()) < \
            TOLERANCE[precision] / 10
        m = onnx.load(str(out / "graphs" / "llm.onnx"), load_external_data=False)
        nbits = [n for n in m.graph.node if n.op_type == "MatMulNBits"]
        assert nbits and {next(x.i for x in n.attribute if x.name == "block_size") for n in nbits} == {block}
        scales = {t.name: t for t in m.graph.initializer}
        sizes[block] = sum(np.prod(scales[n.input[2]].dims) for n in nbits)
        manifest = json.loads((out / "manifest.json").read_text())
        assert f"block {block}," in json.dumps(manifest["graphs"]["llm"])
    assert sizes[64] * 2 == sizes[32]
    with pytest.raises(ExportError, match="--block-size 48: MatMulNBits takes 16, 32, 64, 128, 256"):
        check_options(ExportOptions(precision=precision, block_size=48))
