"""Graphs over EXTERNAL_DATA_BYTES (CLIP ViT-L, SAM ViT-H at true size), at test size: external data written one
tensor at a time (byte for byte what loading the whole graph and saving it writes), TensorRT's view of it (lint and
nxc-build's check), the parity check's shapes, and int8 QDQ and comparisons that hold one graph at a time."""
import json
import shutil
import tracemalloc
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from nxc.config import LLAMA_SIZES, SAM_SIZES, VISION_SIZES, NextChatConfig
from nxc.export import exporter
from nxc.export.graph_files import write_weights
from nxc.export.parity import check_graph, random_inputs
from nxc.export.trt_lint import lint
from nxc.specs import graph_specs


@pytest.fixture(scope="module")
def parts():
    """The modules the vision and SAM wrappers read, tiny and seeded; no LLaMA."""
    from torch import nn
    from transformers import CLIPVisionModel

    from nxc.model.nextchat import build_projector, clip_config
    from nxc.model.sam import build_sam
    cfg = NextChatConfig(llm=replace(LLAMA_SIZES["tiny"], vocab_size=64), vision=VISION_SIZES["tiny"],
                         sam=SAM_SIZES["tiny"], mm_hidden_size=VISION_SIZES["tiny"].hidden_size)
    torch.manual_seed(0)
    m = nn.Module()
    m.config = cfg
    m.vision_tower = CLIPVisionModel(clip_config(cfg.vision))
    m.mm_projector = build_projector(cfg.mm_hidden_size, cfg.llm.hidden_size, cfg.mm_depth)
    m.sam = build_sam(cfg.sam)
    return m.eval()


def _export(parts, graph, path, monkeypatch, external_over=10_000):
    monkeypatch.setattr(exporter, "EXTERNAL_DATA_BYTES", external_over)
    opts = exporter.ExportOptions()
    wrapper = exporter.wrapper_for(parts, graph, opts)
    return wrapper, exporter.export_graph(wrapper, graph_specs(parts.config)[graph], parts.config, path, opts)


def _save_whole(model, path):
    """What export_graph wrote before streaming: the fully loaded graph saved with external data."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def _same_files(a, b):
    for name in (a.name, a.name + ".data"):
        assert (a.parent / name).read_bytes() == (b.parent / name).read_bytes(), name


def test_export_graph_streams_the_files_a_whole_load_would_write(parts, tmp_path, monkeypatch):
    path = tmp_path / "out" / "vision.onnx"
    path.parent.mkdir()
    _, external = _export(parts, "vision", path, monkeypatch)
    assert external == ["vision.onnx.data"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["vision.onnx", "vision.onnx.data"]   # scratch gone
    ref = tmp_path / "ref" / "vision.onnx"
    ref.parent.mkdir()
    _save_whole(onnx.load(str(path)), ref)
    _same_files(path, ref)
    m = onnx.load(str(path), load_external_data=False)
    assert m.producer_name == "nxc" and "graph vision (fp32)" in m.doc_string


def test_small_graph_stays_inline(parts, tmp_path, monkeypatch):
    path = tmp_path / "vision.onnx"
    _, external = _export(parts, "vision", path, monkeypatch, external_over=1 << 30)
    assert external == [] and [p.name for p in tmp_path.iterdir()] == ["vision.onnx"]
    assert not any(t.data_location == TensorProto.EXTERNAL for t in onnx.load(str(path)).graph.initializer)


def _per_tensor_graph(folder, n_big=6, big=(256, 256)):
    """A graph saved as torch.onnx.export saves one over 2 GB: every tensor (a Constant's too) in a file of its own;
    plus a tensor under onnx's 1 KiB threshold and one in typed fields."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(big).astype(np.float32), f"w{i}") for i in range(n_big)]
    inits.append(numpy_helper.from_array(np.array([0.5], np.float32), "small"))
    inits.append(helper.make_tensor("typed", TensorProto.FLOAT, [big[1]], np.ones(big[1], np.float32).tolist()))
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
        rng.standard_normal(big[1]).astype(np.float32), "c_value"))]
    x = "x"
    for i in range(n_big):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"h{i}"]))
        x = f"h{i}"
    nodes += [helper.make_node("Add", [x, "c"], ["a"]), helper.make_node("Add", ["a", "typed"], ["b"]),
              helper.make_node("Mul", ["b", "small"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, big[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, big[1]])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    folder.mkdir()
    onnx.save_model(model, str(folder / "g.onnx"), save_as_external_data=True, all_tensors_to_one_file=False,
                    size_threshold=0, convert_attribute=True)
    return folder / "g.onnx"


def test_per_tensor_files_are_joined_one_tensor_at_a_time(tmp_path):
    raw = _per_tensor_graph(tmp_path / "raw")
    assert len(list(raw.parent.iterdir())) > 6
    out = tmp_path / "out" / "g.onnx"
    out.parent.mkdir()
    model = onnx.load(str(raw), load_external_data=False)
    tracemalloc.start()
    write_weights(model, raw.parent, out.parent / "g.onnx.data")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    onnx.save_model(model, str(out))
    tensor = 256 * 256 * 4
    assert peak < 1.5 * tensor, f"{peak} bytes traced while copying 6 tensors of {tensor}: not one at a time"
    ref = tmp_path / "ref" / "g.onnx"
    ref.parent.mkdir()
    _save_whole(onnx.load(str(raw)), ref)
    _same_files(out, ref)
    x = np.random.default_rng(1).standard_normal((1, 256)).astype(np.float32)
    run = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in (raw, out)]
    np.testing.assert_array_equal(*run)


def test_lint_records_external_data(parts, tmp_path, monkeypatch):
    path = tmp_path / "vision.onnx"
    _export(parts, "vision", path, monkeypatch)
    found = lint(onnx.load(str(path), load_external_data=False))
    assert found["ok"], found["problems"]
    ext = found["external_data"]
    assert ext["files"] == ["vision.onnx.data"] and ext["bytes"] == (tmp_path / "vision.onnx.data").stat().st_size
    assert ext["tensors"] > 0 and "parse_from_file" in ext["note"]
    inline = tmp_path / "inline.onnx"
    _export(parts, "vision", inline, monkeypatch, external_over=1 << 30)
    assert "external_data" not in lint(onnx.load(str(inline), load_external_data=False))


@pytest.mark.parametrize("location", ["/abs/vision.onnx.data", "../vision.onnx.data", "sub/vision.onnx.data",
                                      "C:\\data\\w.bin", ""])
def test_lint_refuses_locations_outside_the_graphs_folder(location):
    t = helper.make_tensor("w", TensorProto.FLOAT, [2, 2], [0.0] * 4)
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", "0"), ("length", "16")):
        e = t.external_data.add()
        e.key, e.value = k, v
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])], initializer=[t])
    found = lint(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert not found["ok"] and found["problem_count"] == 1
    assert f"location {location!r} is not a plain file name" in found["problems"][0]


def test_lint_reports_an_onnx_over_protobufs_limit(monkeypatch):
    from nxc.export import trt_lint
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    monkeypatch.setattr(trt_lint, "PROTOBUF_LIMIT", 10)
    found = lint(helper.make_model(g))
    assert any("over protobuf's 2 GiB limit" in p for p in found["problems"])


@pytest.mark.parametrize("graph,checks", [("sam_encoder", 1), ("sam_decoder", 2), ("vision", 2)])
def test_parity_runs_each_distinct_shape_once(parts, tmp_path, monkeypatch, graph, checks):
    path = tmp_path / f"{graph}.onnx"
    wrapper, _ = _export(parts, graph, path, monkeypatch)
    rep = check_graph(wrapper, path, graph_specs(parts.config)[graph], sam_size=parts.config.sam.image_size)
    assert rep["ok"] and len(rep["checks"]) == checks, rep
    assert len({json.dumps(c["axes"], sort_keys=True) for c in rep["checks"]}) == checks


def test_int8_of_a_graph_with_external_data(parts, tmp_path, monkeypatch):
    """quantize_static_graph calibrates first, then quantizes from the cache: the same graph and ranges as ONNX
    Runtime's one quantize_static call, for a source with external data; an int8 graph over inline_bytes gets its
    own data file."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from nxc.calib.quantize import _Reader, compare_graphs, quantize_static_graph
    src = tmp_path / "fp32" / "sam_encoder.onnx"
    src.parent.mkdir()
    _export(parts, "sam_encoder", src, monkeypatch)
    assert (src.parent / "sam_encoder.onnx.data").is_file()
    spec = graph_specs(parts.config)["sam_encoder"]
    feeds = [random_inputs(spec, {}, np.random.default_rng(i), sam_size=parts.config.sam.image_size) for i in range(3)]
    (tmp_path / "whole").mkdir()
    quantize_static(str(src), str(tmp_path / "whole" / "q.onnx"), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                    calibration_cache_path=str(tmp_path / "whole" / "ranges.json"))
    (tmp_path / "split").mkdir()
    external = quantize_static_graph(src, tmp_path / "split" / "q.onnx", feeds, method="minmax",
                                     cache=tmp_path / "split" / "ranges.json")
    assert external == []
    for name in ("q.onnx", "ranges.json"):
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    assert sorted(p.name for p in (tmp_path / "split").iterdir()) == ["q.onnx", "ranges.json"]   # no scratch left

    (tmp_path / "big").mkdir()
    shutil.copy(tmp_path / "split" / "ranges.json", tmp_path / "big" / "ranges.json")
    external = quantize_static_graph(src, tmp_path / "big" / "q.onnx", None, method="minmax",
                                     cache=tmp_path / "big" / "ranges.json", inline_bytes=0)
    assert external == ["q.onnx.data"] and (tmp_path / "big" / "q.onnx.data").is_file()
    same = compare_graphs(tmp_path / "split" / "q.onnx", tmp_path / "big" / "q.onnx", feeds[:1])
    assert same["image_embedding"] == {"cosine": pytest.approx(1.0), "max_abs": 0.0}
    vs_fp32 = compare_graphs(src, tmp_path / "big" / "q.onnx", feeds)
    assert 0.5 < vs_fp32["image_embedding"]["cosine"] < 1.0


def test_weights_wait_on_disk_and_come_back_bit_for_bit(tmp_path):
    from torch import nn

    from nxc.export.parity import weights_on_disk
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8).half())
    m.register_buffer("table", torch.arange(6, dtype=torch.int64).reshape(2, 3))
    m[2].weight = nn.Parameter(m[0].weight.detach().half())               # its own storage
    m.tied = m[0]                                                           # the same module twice
    m.view = nn.Parameter(m[1].weight.detach()[:4], requires_grad=False)   # a view: stays in memory
    before = {n: (t, t.detach().clone()) for n, t in list(m.named_parameters()) + list(m.named_buffers())}
    with weights_on_disk(m, tmp_path) as moved:
        assert moved == 6 and len(list(tmp_path.iterdir())) == 6
        assert m[0].weight.numel() == 0 and m.table.numel() == 0 and m.view.numel() == 4 and m[1].weight.numel() == 8
    assert not list(tmp_path.iterdir())
    for n, (t, copy) in before.items():
        now = dict(list(m.named_parameters()) + list(m.named_buffers()))[n]
        assert now is t and now.dtype == copy.dtype and torch.equal(now, copy), n
    assert m[0].weight.requires_grad and not m.view.requires_grad


def test_parity_with_the_torch_weights_on_disk(parts, tmp_path, monkeypatch):
    from nxc.export import parity
    path = tmp_path / "vision.onnx"
    wrapper, _ = _export(parts, "vision", path, monkeypatch)
    state = {k: v.clone() for k, v in wrapper.state_dict().items()}
    monkeypatch.setattr(parity, "OFFLOAD_BYTES", 0)
    rep = check_graph(wrapper, path, graph_specs(parts.config)["vision"])
    assert rep["ok"] and len(rep["checks"]) == 2
    assert all(torch.equal(v, state[k]) for k, v in wrapper.state_dict().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision.onnx", "vision.onnx.data"]


def test_fp16_reference_products_compute_in_float32_and_round():
    """The fp16 check's torch reference (HalfProductsInFloat): each product of float16 CPU tensors equals the
    float32 product rounded to float16, bit for bit; float32 tensors and elementwise ops pass through untouched."""
    from nxc.export.parity import HalfProductsInFloat
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 8, 16, 16, generator=g).half()
    conv, lin = torch.nn.Conv2d(8, 4, 3).half(), torch.nn.Linear(16, 5).half()
    a, b = torch.randn(2, 7, 16, generator=g).half(), torch.randn(2, 16, 9, generator=g).half()
    cases = [(lambda: conv(x), lambda: conv.float()(x.float())),
             (lambda: lin(a), lambda: lin.float()(a.float())),
             (lambda: a @ b, lambda: a.float() @ b.float()),
             (lambda: torch.einsum("bik,bkj->bij", a, b), lambda: torch.einsum("bik,bkj->bij", a.float(), b.float()))]
    for i, (half, by_hand) in enumerate(cases):
        mode = HalfProductsInFloat()
        with torch.no_grad(), mode:
            got = half()
        conv.half(), lin.half()
        with torch.no_grad():
            want = by_hand().half()
        conv.half(), lin.half()
        assert mode.hits == 1, i
        assert got.dtype == torch.float16 and torch.equal(got, want), i
    mode = HalfProductsInFloat()
    with mode:
        y = a.float() @ b.float()
        z = a + 1
    assert mode.hits == 0 and y.dtype == torch.float32 and z.dtype == torch.float16
