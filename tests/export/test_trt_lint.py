"""The TensorRT readiness lint flags what the parser rejects and passes what it takes."""
import onnx
import pytest
from onnx import TensorProto, helper

from nxc.export.trt_lint import lint, table


def model(nodes, inputs, outputs, opset=17, initializers=()):
    g = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid("com.microsoft", 1)])


def vi(name, t=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, t, [2, 3])


def test_plain_graph_passes():
    m = model([helper.make_node("Relu", ["x"], ["y"], name="r"), helper.make_node("LayerNormalization", ["y", "s"], ["z"])],
              [vi("x")], [vi("z")], initializers=[helper.make_tensor("s", TensorProto.FLOAT, [3], [1, 1, 1])])
    found = lint(m)
    assert found["ok"], found["problems"]
    assert found["ops"] == {"LayerNormalization": 1, "Relu": 1}


@pytest.mark.parametrize("node,inputs,message", [
    (helper.make_node("GroupQueryAttention", ["x"], ["y"], domain="com.microsoft", name="gqa"), [vi("x")],
     "custom-domain op com.microsoft::GroupQueryAttention"),
    (helper.make_node("StringNormalizer", ["x"], ["y"], name="sn"), [vi("x")],
     "operator StringNormalizer is not supported"),
    (helper.make_node("Relu", ["x"], ["y"], name="r"), [vi("x", TensorProto.UINT16)], "type UINT16 is not a TensorRT type"),
    (helper.make_node("Unsqueeze", ["x", "axes"], ["y"], name="u"), [vi("x"), vi("axes", TensorProto.INT64)],
     "Unsqueeze axes must be a constant"),
])
def test_blockers_are_reported(node, inputs, message):
    found = lint(model([node], inputs, [vi("y")]))
    assert not found["ok"]
    assert any(message in p for p in found["problems"]), found["problems"]


def test_newer_opset_is_reported():
    found = lint(model([helper.make_node("Relu", ["x"], ["y"])], [vi("x")], [vi("y")], opset=21))
    assert any("opset 21 is newer" in p for p in found["problems"])


def test_table_names_its_sources():
    t = table()
    assert t["sources"] and "onnx-tensorrt" in t["sources"][0]
    assert "MatMul" in t["operators"] and "NonZero" in t["operators"] and "StringNormalizer" not in t["operators"]
    assert isinstance(onnx.__version__, str)
