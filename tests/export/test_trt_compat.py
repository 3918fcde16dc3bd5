"""The TensorRT ONNX-parser compatibility check (export.trt_compat) on small hand-built graphs: each
kind of problem is caught, and a clean graph passes. (The exported networks are checked in
test_onnx_export.py.)"""

import onnx
import pytest
from onnx import TensorProto, helper

from export.trt_compat import check_model, operator_table


def _model(nodes, inputs, outputs, initializers=(), opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports)


def _vi(name, elem=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, elem, list(shape))


def test_table_is_the_published_one():
    table = operator_table()
    assert "onnx-tensorrt" in table["source"] and table["tensorrt_version"]
    assert table["opset_min"] <= 17 <= table["opset_max"]
    for op in ("MatMul", "LayerNormalization", "InstanceNormalization", "Softmax", "Resize", "Conv", "Erf"):
        assert op in table["supported"], op
    assert "Unique" in table["unsupported"] and not set(table["supported"]) & set(table["unsupported"])


def test_clean_graph_passes():
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("ReduceSum", ["r", "axes"], ["y"], keepdims=1)]
    assert check_model(_model(nodes, [_vi("x")], [_vi("y", shape=(2, 1))], [axes])) == []


def test_unsupported_and_custom_ops_are_named():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq"),
             helper.make_node("FusedGemm", ["x", "x"], ["y"], domain="com.microsoft", name="fused")]
    problems = check_model(_model(nodes, [_vi("x")], [_vi("y")], domains=["com.microsoft"]))
    assert any("uniq" in p and "unsupported" in p for p in problems)
    assert any("fused" in p and "com.microsoft" in p for p in problems)


def test_axes_must_be_build_time_constants():
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "zero", "one"], ["axes"]),
             helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")]
    inits = [helper.make_tensor("zero", TensorProto.INT64, [1], [0]), helper.make_tensor("one", TensorProto.INT64, [1], [1])]
    problems = check_model(_model(nodes, [_vi("x")], [_vi("y")], inits))
    assert len(problems) == 1 and "mean" in problems[0] and "build-time constant" in problems[0]


def test_types_opsets_and_resize_modes():
    sin_int = [helper.make_node("Sin", ["i"], ["y"], name="sin")]
    assert any("INT64" in p for p in check_model(_model(sin_int, [_vi("i", TensorProto.INT64)],
                                                         [_vi("y", TensorProto.INT64)])))
    sin_double = [helper.make_node("Sin", ["d"], ["y"])]  # DOUBLE is cast down to FLOAT by the parser
    assert check_model(_model(sin_double, [_vi("d", TensorProto.DOUBLE)], [_vi("y", TensorProto.DOUBLE)])) == []
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    assert any("opset 25" in p for p in check_model(_model(relu, [_vi("x")], [_vi("y")], opset=25)))
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    resize = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="cubic", name="up")]
    problems = check_model(_model(resize, [_vi("x", shape=(1, 1, 2, 2))], [_vi("y", shape=(1, 1, 4, 4))], [scales]))
    assert any("up" in p and "cubic" in p for p in problems)


def test_layernorm_extra_outputs_and_subgraphs():
    ln = helper.make_node("LayerNormalization", ["x", "w"], ["y", "mean", "inv"], name="ln")
    w = helper.make_tensor("w", TensorProto.FLOAT, [3], [1, 1, 1])
    assert any("ln" in p and "first output" in p for p in check_model(_model([ln], [_vi("x")], [_vi("y")], [w])))
    branch = helper.make_graph([helper.make_node("Unique", ["x"], ["z"], name="deep")], "b", [], [_vi("z")])
    plain = helper.make_graph([helper.make_node("Identity", ["x"], ["z2"])], "c", [], [_vi("z2")])
    cond = helper.make_node("If", ["c"], ["y"], then_branch=branch, else_branch=plain, name="if")
    problems = check_model(_model([cond], [_vi("c", TensorProto.BOOL, ()), _vi("x")], [_vi("y")]))
    assert any("deep" in p and "Unique" in p for p in problems)


def test_check_model_reads_files(tmp_path):
    path = str(tmp_path / "g.onnx")
    onnx.save(_model([helper.make_node("Unique", ["x"], ["y"])], [_vi("x")], [_vi("y")]), path)
    assert check_model(path)


@pytest.mark.parametrize("op", ["NonZero", "Gelu", "GroupNormalization", "Attention"])
def test_newer_ops_of_tensorrt_10_are_supported(op):
    assert op in operator_table()["supported"]


def test_table_covers_the_tensorrt_range_setup_py_allows():
    """The table says which releases it answers for; the 11.x releases setup.py allows are among them."""
    import re
    from pathlib import Path

    table = operator_table()
    setup = (Path(__file__).resolve().parents[2] / "setup.py").read_text()
    upper = re.search(r'"tensorrt>=[\d.]+,<(\d+)"', setup).group(1)
    assert table["applies_to"].endswith(f",<{upper}")
    majors = {key.split(".")[0] for key in table["later_releases"] if key[0].isdigit()}
    assert majors == {str(m) for m in range(int(table["tensorrt_version"].split(".")[0]) + 1, int(upper))}
    for op in ("RotaryEmbedding", "RMSNormalization", "TensorScatter"):  # added in 10.15: older parsers lack them
        assert op in table["supported"] and op in table["later_releases"]["why"]
