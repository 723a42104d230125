"""graphfuse.trt_check: what TensorRT's ONNX parser cannot take, found without TensorRT."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfuse.errors import GraphfuseError
from graphfuse.trt_check import Finding, check_tensorrt, format_findings, parse_version

F = TensorProto.FLOAT


def _model(nodes, inputs, outputs, initializers=(), opset=18, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _vi(name, elem=F, shape=("b", 8)):
    return helper.make_tensor_value_info(name, elem, shape)


def _w(name, shape=(8, 8)):
    return numpy_helper.from_array(np.ones(shape, np.float32), name)


def _matmul_add():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="add"),
    ]
    return _model(nodes, [_vi("x")], [_vi("y")], [_w("w"), _w("bias", (8,))])


@pytest.mark.parametrize("version", ["10", "11", "10.13", "11.4"])
def test_plain_matmul_add_model_passes(version):
    model = _matmul_add()
    onnx.checker.check_model(model)
    assert check_tensorrt(model, version) == []
    assert format_findings([], version).startswith("no problems found")


def test_contrib_op_of_a_non_standard_domain_is_flagged():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("FastGelu", ["h"], ["y"], name="gelu", domain="com.microsoft"),
    ]
    model = _model(nodes, [_vi("x")], [_vi("y")], [_w("w")], extra_opsets=[("com.microsoft", 1)])
    findings = check_tensorrt(model, "10")
    assert findings == [
        Finding(
            "com.microsoft.FastGelu",
            "gelu",
            "domain 'com.microsoft' is not part of TensorRT 10.15's ONNX parser; it imports only "
            "as a TensorRT plugin named 'FastGelu' registered before parsing",
        )
    ]


def test_op_listed_as_unsupported_and_op_absent_from_the_table():
    nodes = [
        helper.make_node("Unique", ["x"], ["u"], name="uniq"),
        helper.make_node("Swish", ["x"], ["y"], name="swish"),  # opset 24; parser support: 11.0
    ]
    model = _model(nodes, [_vi("x")], [_vi("u", shape=None), _vi("y")], opset=24)
    by_node = {f.node: f for f in check_tensorrt(model, "10")}
    assert "listed as unsupported" in by_node["uniq"].reason
    assert "not listed" in by_node["swish"].reason
    assert [f.node for f in check_tensorrt(model, "11")] == ["uniq"]


def test_reduce_axes_must_be_constant():
    computed_axes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Slice", ["s", "one", "two"], ["axes"]),
        helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean"),
    ]
    inits = [
        numpy_helper.from_array(np.array([1]), "one"),
        numpy_helper.from_array(np.array([2]), "two"),
    ]
    model = _model(computed_axes, [_vi("x")], [_vi("y", shape=None)], inits)
    (finding,) = check_tensorrt(model, "10")
    assert (finding.op, finding.node) == ("ReduceMean", "mean")
    assert "`axes` is computed at run time" in finding.reason

    constant_axes = [helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")]
    inits = [numpy_helper.from_array(np.array([-1]), "axes")]
    assert check_tensorrt(_model(constant_axes, [_vi("x")], [_vi("y", shape=None)], inits)) == []


def test_if_branches_with_one_output_name_and_a_nested_unsupported_op():
    then_graph = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["out"], name="inner_unique")],
        "then",
        [],
        [_vi("out", shape=None)],
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["out"], name="inner_identity")],
        "else",
        [],
        [_vi("out", shape=None)],
    )
    node = helper.make_node(
        "If", ["cond"], ["y"], name="branch", then_branch=then_graph, else_branch=else_graph
    )
    model = _model([node], [_vi("cond", TensorProto.BOOL, []), _vi("x")], [_vi("y", shape=None)])
    findings = check_tensorrt(model, "10")
    reasons = {f.node: f.reason for f in findings}
    assert "both branches output a tensor named 'out'" in reasons["branch"]
    assert "listed as unsupported" in reasons["branch/then_branch/inner_unique"]


def test_opset_range_depends_on_the_version():
    model = _matmul_add()
    model.opset_import[0].version = 25
    assert [f.node for f in check_tensorrt(model, "10")] == ["(opset)"]
    assert check_tensorrt(model, "11.4")[0].reason.startswith("opset 25 is newer")
    assert check_tensorrt(model, "11.5") == []


def test_squeeze_without_axes_needs_a_static_shape_before_11_5():
    def squeeze(shape):
        node = helper.make_node("Squeeze", ["x"], ["y"], name="sq")
        return _model([node], [_vi("x", shape=shape)], [_vi("y", shape=None)])

    assert [f.reason for f in check_tensorrt(squeeze(("b", 1, 8)), "11.4")] == [
        "Squeeze without axes on a dynamic shape is supported from TensorRT 11.5"
    ]
    assert check_tensorrt(squeeze((1, 8)), "10") == []  # static: the parser infers the axes
    assert check_tensorrt(squeeze(("b", 1, 8)), "11.5") == []
    (unknown,) = check_tensorrt(squeeze(None), "10")
    assert unknown.severity == "warning"


def test_types_outside_the_supported_types_column():
    nonzero_bf16 = _model(
        [helper.make_node("NonZero", ["x"], ["y"], name="nz")],
        [_vi("x", TensorProto.BFLOAT16)],
        [_vi("y", TensorProto.INT64, shape=None)],
    )
    (finding,) = check_tensorrt(nonzero_bf16, "10")
    assert finding.reason == "BFLOAT16 data is not supported (supported: FP32 FP16)"

    double = _model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [_vi("x", TensorProto.DOUBLE)],
        [_vi("y", TensorProto.DOUBLE)],
    )
    severities = {(f.node, f.severity) for f in check_tensorrt(double, "10")}
    assert ("relu", "warning") in severities


def test_attention_with_a_kv_cache_input_is_flagged_and_needs_10_14():
    shape = (1, 2, 4, 8)
    attention = helper.make_node(
        "Attention", ["q", "k", "v", "", "past_k", "past_v"], ["y", "pk", "pv"], name="attn"
    )
    model = _model(
        [attention],
        [_vi(n, shape=shape) for n in ("q", "k", "v", "past_k", "past_v")],
        [_vi(n, shape=None) for n in ("y", "pk", "pv")],
        opset=23,
    )
    assert "input `past_key` is unsupported" in check_tensorrt(model, "10")[0].reason
    assert "not listed" in check_tensorrt(model, "10.13")[0].reason


def test_model_path_with_external_data(tmp_path):
    model = _matmul_add()
    path = tmp_path / "model.onnx"
    onnx.save(model, path, save_as_external_data=True, location="model.data", size_threshold=0)
    assert check_tensorrt(path, "11") == []


def test_format_findings_summary():
    findings = [
        Finding("Unique", "uniq", "listed as unsupported"),
        Finding("Relu", "r", "DOUBLE", "warning"),
    ]
    text = format_findings(findings, "10")
    assert text.splitlines()[-1] == "1 error(s), 1 warning(s) for the TensorRT 10.15 ONNX parser"


@pytest.mark.parametrize("bad", ["9", "12", "ten"])
def test_versions_outside_10_and_11_are_refused(bad):
    with pytest.raises(GraphfuseError):
        parse_version(bad)


def test_missing_file_is_a_graphfuse_error(tmp_path):
    with pytest.raises(GraphfuseError, match="not found"):
        check_tensorrt(tmp_path / "absent.onnx")
