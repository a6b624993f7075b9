"""The `projector` graph (nxc.export.projector): parity with the torch module at batch 1 and 2, fp16 and int8
accuracy against fp32, TensorRT lint, and an export that fails loudly when the graph is off.

Measured on the tiny projector (seed 0, random inputs): fp32 max abs 5e-7; fp16 cosine 0.99999992, max abs 9e-4;
int8 weight-only cosine 0.99994, max abs 0.027. At NExT-GPT's real sizes (32 M parameters): fp32 2.3e-6, fp16
cosine 0.9999999 / 1.4e-3, int8 cosine 0.99992 / 0.037. The bounds below leave a margin over those."""
import numpy as np
import onnx
import pytest
import torch

from nxc.config import PROJECTOR_SIZES
from nxc.export.outdir import ExportError
from nxc.export.projector import ProjectorGraph, TorchReference, export_projector
from nxc.model.nextgpt_projector import OutputProjector
from nxc.specs import projector_spec

TINY = PROJECTOR_SIZES["tiny"]
BOUNDS = {"fp16": {"cosine": 0.9999, "max_abs": 1e-2}, "int8": {"cosine": 0.999, "max_abs": 0.1}}


@pytest.fixture(scope="module")
def projector():
    torch.manual_seed(0)
    return OutputProjector(TINY).eval()


@pytest.fixture(scope="module")
def builds(projector, tmp_path_factory):
    out = {}
    for precision in ("fp32", "fp16", "int8"):
        d = tmp_path_factory.mktemp(precision)
        out[precision] = (d, export_projector(projector, TINY, d, precision=precision, log=lambda _m: None))
    return out


def test_wrapper_is_the_module(projector):
    h, e = torch.randn(3, 4, 64), torch.randn(3, 4, 64)
    with torch.no_grad():
        assert torch.allclose(ProjectorGraph(projector)(h, e), projector(h, e), atol=1e-5)
        assert torch.allclose(TorchReference(projector)(h, e), projector(h, e), atol=1e-5)


def test_fp32_matches_torch_at_batch_1_and_2(builds):
    d, rec = builds["fp32"]
    assert (d / rec["file"]).is_file() and rec["external_data"] == []
    assert rec["parity"]["ok"]
    assert [c["axes"] for c in rec["parity"]["checks"]] == [{"batch": 1}, {"batch": 2}]
    for c in rec["parity"]["checks"]:
        assert c["ok"] and c["rtol"] == c["atol"] == 1e-4
        assert c["outputs"]["conditioning"]["max_abs"] < 1e-4


def test_graph_io_is_the_spec(builds, projector):
    import onnxruntime as ort
    d, rec = builds["fp32"]
    spec = projector_spec(TINY)
    assert {k: rec[k] for k in ("inputs", "outputs")} == spec.to_dict()
    sess = ort.InferenceSession(str(d / rec["file"]), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["hidden", "embeds"]
    assert [o.name for o in sess.get_outputs()] == ["conditioning"]
    h, e = torch.randn(3, 4, 64), torch.randn(3, 4, 64)      # a batch the check did not use
    got = sess.run(None, {"hidden": h.numpy(), "embeds": e.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, projector(h, e).numpy(), atol=1e-4)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_tensorrt_lint_is_clean(builds, precision):
    d, rec = builds[precision]
    assert rec["tensorrt_lint"]["ok"], rec["tensorrt_lint"]["problems"]
    assert "LayerNormalization" in rec["tensorrt_lint"]["ops"] and "Softmax" in rec["tensorrt_lint"]["ops"]


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_accuracy_against_fp32_is_within_bounds(builds, precision):
    acc = builds[precision][1]["accuracy"]["conditioning"]
    assert acc["cosine"] >= BOUNDS[precision]["cosine"], acc
    assert acc["max_abs"] <= BOUNDS[precision]["max_abs"], acc


def test_fp16_keeps_its_norms_in_float32(builds):
    rec = builds["fp16"][1]
    assert rec["precision"] == "fp16" and rec["parity"]["ok"]
    assert rec["fp32_nodes"]["ops"]["LayerNormalization"] == 2 * TINY.encoder_layers + 3 * TINY.decoder_layers + 2


def test_int8_quantizes_every_weight(builds):
    d, rec = builds["int8"]
    assert rec["precision"] == "int8-weight-only"
    per_layer = 6 * TINY.encoder_layers + 10 * TINY.decoder_layers     # q, k, v, out (x2 in a decoder), 2 linears
    assert rec["quantization"]["weights"] == per_layer + 2 == rec["tensorrt_lint"]["ops"]["DequantizeLinear"]
    g = onnx.load(str(d / rec["file"])).graph
    floats = [i.name for i in g.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2]
    assert floats == [], floats                                       # no weight left in float (query_embs is 3-D)


def test_unknown_precision_is_refused(projector, tmp_path):
    with pytest.raises(ExportError, match=r"precision 'bf16' is not available; choose one of"):
        export_projector(projector, TINY, tmp_path, precision="bf16")


def test_a_graph_that_does_not_match_fails_the_export(projector, tmp_path, monkeypatch):
    monkeypatch.setattr(ProjectorGraph, "_feed_forward", staticmethod(lambda layer, x: layer.linear2(layer.linear1(x))))
    with pytest.raises(ExportError, match=r"graph projector \(fp32\) does not match torch"):
        export_projector(projector, TINY, tmp_path, log=lambda _m: None)
