"""int8 / int4 exports: calibration cache reuse, bad calibration input, precision records, accuracy report."""
import json

import pytest

from nxc.calib.data import CalibrationError, calibration_images
from nxc.export.exporter import ExportOptions, export_build
from nxc.manifest import load_manifest

FAST = dict(calib_samples=4, graphs=("vision", "llm", "loc_heads", "sam_decoder"))


@pytest.fixture(scope="module")
def int8_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "int8"
    export_build(None, out, options=ExportOptions(precision="int8", **FAST))
    return out


def test_int8_manifest_records_each_graphs_precision(int8_build):
    m = load_manifest(int8_build)
    assert m.precision == "int8"
    prec = {g: v.precision for g, v in m.graphs.items()}
    assert prec == {"vision": "int8", "llm": "int8-weight-only", "loc_heads": "int8-weight-only", "sam_decoder": "fp32"}
    assert m.graphs["vision"].extra["quantization"]["ranges"] == "calib/vision.json"
    assert (int8_build / "calib" / "vision.json").is_file()
    ops = m.graphs["vision"].extra["tensorrt_lint"]["ops"]
    assert ops.get("QuantizeLinear") and ops.get("DequantizeLinear")     # explicit QDQ: what TensorRT takes
    assert "com.microsoft::MatMulNBits" in m.graphs["llm"].extra["tensorrt_lint"]["ops"]
    acc = json.loads((int8_build / "reports" / "accuracy.json").read_text())
    for g in ("vision", "llm", "loc_heads"):
        assert min(v["cosine"] for v in acc["graphs"][g].values()) > 0.98, (g, acc["graphs"][g])


def test_second_export_reuses_calibration(int8_build, capsys):
    before = (int8_build / "calib" / "vision.json").read_text()
    export_build(None, int8_build, options=ExportOptions(precision="int8", **FAST))
    err = capsys.readouterr().err
    assert "calibration: reusing the ranges" in err and "calibration inputs:" not in err
    assert "calibration run" not in err                      # cached ranges: no calibration session
    assert json.loads((int8_build / "calib" / "calib.json").read_text())["reused"] is True
    assert (int8_build / "calib" / "vision.json").read_text() == before
    export_build(None, int8_build, options=ExportOptions(precision="int8", recalibrate=True, **FAST))
    err = capsys.readouterr().err
    assert "calibration: 4 images" in err and "reusing" not in err
    # long steps show progress: each calibration run, the QDQ write, each run of the accuracy check
    assert "vision: calibration run 4/4" in err and "vision: writing the int8 QDQ graph" in err
    assert "vision: accuracy check, quantized run 1/" in err
    export_build(None, int8_build, options=ExportOptions(precision="int8", calib_method="percentile", **FAST))
    assert "reusing" not in capsys.readouterr().err          # another method: new ranges


def test_int4_llm_is_block_wise_4_bit(tmp_path):
    out = export_build(None, tmp_path / "int4", options=ExportOptions(precision="int4", calib_samples=2,
                                                                      graphs=("llm", "loc_heads")))
    m = load_manifest(out)
    assert m.graphs["llm"].precision == "int4-weight-only"
    import onnx
    nodes = [n for n in onnx.load(str(m.graph_path("llm"))).graph.node if n.op_type == "MatMulNBits"]
    assert nodes and all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in nodes)


def test_empty_and_unreadable_calibration_folders_are_refused(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match=r"empty: no images \(looked for .png"):
        calibration_images(empty, samples=4, embedded=True)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(CalibrationError, match=r"a\.png: .*Remove or replace that file"):
        calibration_images(bad, samples=4, embedded=True)


def test_real_checkpoint_without_calibration_images_is_refused(tiny_ckpt_export, tmp_path, capsys):
    from nxc.export.cli import main
    assert main([str(tiny_ckpt_export), "--int8", "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert "needs --calib-images DIR" in err and "Traceback" not in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.partial-*"))


def test_fp16_manifest_records_float32_nodes(tmp_path):
    out = export_build(None, tmp_path / "fp16", options=ExportOptions(precision="fp16", graphs=("vision", "llm")))
    m = load_manifest(out)
    for g in ("vision", "llm"):
        rec = m.graphs[g].extra["fp32_nodes"]
        assert rec["count"] > 0 and rec["nodes"]
    assert "LayerNormalization" in m.graphs["vision"].extra["fp32_nodes"]["ops"]
    assert "Softmax" in m.graphs["llm"].extra["fp32_nodes"]["ops"]
    acc = json.loads((out / "reports" / "accuracy.json").read_text())["graphs"]
    assert set(acc) == {"vision", "llm"}
    assert all(v["cosine"] > 0.99 for g in acc.values() for v in g.values()), acc
    assert not list(tmp_path.glob(".fp32ref-*"))


def test_float_graphs_keeps_an_encoder_float32_in_an_int4_build(tmp_path, capsys):
    """--float-graphs sam_encoder: no calibration and no QDQ for it (a SAM ViT-H's calibration is the largest step
    of a true-size int4 export); the other encoders are quantized as usual."""
    out = export_build(None, tmp_path / "int4", options=ExportOptions(
        precision="int4", calib_samples=2, graphs=("vision", "sam_encoder"), float_graphs=("sam_encoder",)))
    m = load_manifest(out)
    assert m.graphs["vision"].precision == "int8" and m.graphs["sam_encoder"].precision == "fp32"
    assert "sam_encoder: int8 QDQ" not in capsys.readouterr().err
    assert not (out / "calib" / "sam_encoder.json").exists()


def test_compare_graphs_counts_two_all_zero_outputs_as_equal(tmp_path):
    """A projector whose last weight is zero (nxc-make-checkpoint --trigger-prompt) gives all-zero image rows in both
    graphs: that is cosine 1, not 0; one zero output against a non-zero one stays 0."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from nxc.calib.quantize import compare_graphs

    def graph(path, scale):
        g = helper.make_graph([helper.make_node("Mul", ["x", "s"], ["y"])], "t",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
                              [onnx.numpy_helper.from_array(np.full(2, scale, np.float32), "s")])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 9
        onnx.save(m, str(path))
        return path
    zero, one = graph(tmp_path / "z.onnx", 0.0), graph(tmp_path / "o.onnx", 1.0)
    feeds = [{"x": np.ones(2, np.float32)}]
    assert compare_graphs(zero, zero, feeds)["y"]["cosine"] == 1.0
    assert compare_graphs(one, zero, feeds)["y"]["cosine"] == 0.0
