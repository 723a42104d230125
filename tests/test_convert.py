"""graphfuse.convert: fp32 -> fp16/bf16 with RMSNorm and reductions kept in fp32 islands.

Tolerances (max |a - b| / max |a| over the output, seeded inputs): fp16 keeps 11 significant
bits (unit roundoff 4.9e-4), so 2e-3 leaves room for a few roundings in the matmuls; bf16 keeps
8 bits (3.9e-3), hence 2e-2.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphfuse.convert as convert_module
from graphfuse.convert import conversion_error, convert, convert_precision
from graphfuse.errors import GraphfuseError

H, INTER = 16, 32
FP16_TOL = 2e-3
BF16_TOL = 2e-2


def _ffn_block(residual=True):
    """Pre-norm SwiGLU FFN (with its residual Add), as the dynamo exporter writes it."""
    rng = np.random.default_rng(0)

    def weight(*shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32))

    inits = [
        numpy_helper.from_array(np.array(2.0, np.float32), "two"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array((1 + 0.1 * rng.standard_normal(H)).astype(np.float32), "gamma"),
    ]
    for name, shape in (("w_gate", (H, INTER)), ("w_up", (H, INTER)), ("w_down", (INTER, H))):
        tensor = weight(*shape)
        tensor.name = name
        inits.append(tensor)
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean", keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["ms_eps"], name="add_eps"),
        helper.make_node("Sqrt", ["ms_eps"], ["rms"], name="sqrt"),
        helper.make_node("Reciprocal", ["rms"], ["inv_rms"], name="reciprocal"),
        helper.make_node("Mul", ["x", "inv_rms"], ["normed"], name="scale"),
        helper.make_node("Mul", ["gamma", "normed"], ["z"], name="gain"),
        helper.make_node("MatMul", ["z", "w_gate"], ["gate"], name="gate_proj"),
        helper.make_node("Sigmoid", ["gate"], ["sig"], name="sigmoid"),
        helper.make_node("Mul", ["gate", "sig"], ["silu"], name="silu"),
        helper.make_node("MatMul", ["z", "w_up"], ["up"], name="up_proj"),
        helper.make_node("Mul", ["silu", "up"], ["hidden"], name="glu"),
        helper.make_node("MatMul", ["hidden", "w_down"], ["down"], name="down_proj"),
        helper.make_node("Add", ["x", "down"], ["y"], name="residual")
        if residual
        else helper.make_node("Identity", ["down"], ["y"], name="out"),
    ]
    graph = helper.make_graph(
        nodes,
        "ffn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    return model


def _feeds(scale=1.0, seed=1):
    rng = np.random.default_rng(seed)
    return {"x": (rng.standard_normal((2, 3, H)) * scale).astype(np.float32)}


def _input_types(model):
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.graph.value_info, *inferred.graph.input]
    }
    types.update({t.name: t.data_type for t in inferred.graph.initializer})
    return {n.name: [types.get(i) for i in n.input] for n in inferred.graph.node}


def test_rmsnorm_chain_stays_fp32_and_matmuls_go_fp16():
    converted, report = convert_precision(_ffn_block(), "fp16")
    onnx.checker.check_model(converted, full_check=True)
    inputs = _input_types(converted)
    for name in ("pow", "mean", "add_eps", "sqrt", "reciprocal", "scale", "gain"):
        assert TensorProto.FLOAT16 not in inputs[name], name
    for name in ("gate_proj", "up_proj", "down_proj", "glu", "residual"):
        assert set(inputs[name]) == {TensorProto.FLOAT16}, name
    assert report.fp32_nodes == ["pow", "mean", "add_eps", "sqrt", "reciprocal", "scale", "gain"]
    weights = {t.name: t.data_type for t in converted.graph.initializer}
    assert weights["w_gate"] == weights["w_up"] == weights["w_down"] == TensorProto.FLOAT16
    assert weights["gamma"] == weights["eps"] == TensorProto.FLOAT
    # Graph I/O stays fp32: one Cast into the fp16 part per tensor, one back out.
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT
    assert report.casts_inserted == 3
    assert all(
        n.doc_string == "graphfuse.convert" for n in converted.graph.node if n.op_type == "Cast"
    )


def test_fp16_runs_in_onnxruntime_within_tolerance():
    model = _ffn_block()
    converted = convert(model, "fp16")
    assert conversion_error(model, converted, _feeds()) < FP16_TOL


def test_fp32_islands_prevent_the_rmsnorm_overflow(monkeypatch):
    # |x| ~ 400: x² ~ 1.6e5 is past fp16's 65504, so a Pow/ReduceMean in fp16 gives inf and
    # the FFN output collapses (compared without the residual, which would hide it).
    # The reference evaluator computes in true fp16: ONNX Runtime's CPU provider would run the
    # fp16 Pow/ReduceMean in fp32 behind its own Casts and hide the overflow.
    model, feeds = _ffn_block(residual=False), _feeds(scale=400.0)
    converted = convert(model, "fp16")
    assert conversion_error(model, converted, feeds, runtime="reference") < FP16_TOL
    monkeypatch.setattr(convert_module, "KEEP_FP32_OPS", frozenset())
    naive = convert(model, "fp16")
    assert conversion_error(model, naive, feeds, runtime="reference") > 0.5  # why islands exist


def test_bf16_converts_and_evaluates_with_the_reference_runtime():
    model = _ffn_block()
    converted, report = convert_precision(model, "bf16")
    weights = {t.name: t.data_type for t in converted.graph.initializer}
    assert weights["w_down"] == TensorProto.BFLOAT16
    assert "mean" in report.fp32_nodes
    assert conversion_error(model, converted, _feeds()) < BF16_TOL


def test_low_precision_graph_io():
    model = _ffn_block()
    converted = convert(model, "fp16", keep_io_types=False)
    assert converted.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert converted.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    assert conversion_error(model, converted, _feeds()) < FP16_TOL  # feeds are cast for it


def test_square_variant_and_a_constant_shared_by_both_precisions():
    # Legacy-exporter RMSNorm: Mul(x, x) and Div(1, Sqrt). "one" feeds the fp32 island
    # (Div(1, sqrt)) and an fp16 Add: it must exist in both types.
    nodes = [
        helper.make_node("Mul", ["x", "x"], ["sq"], name="square"),
        helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean"),
        helper.make_node("Sqrt", ["ms"], ["rms"], name="sqrt"),
        helper.make_node("Div", ["one", "rms"], ["inv"], name="div"),
        helper.make_node("Mul", ["x", "inv"], ["normed"], name="scale"),
        helper.make_node("MatMul", ["normed", "w"], ["h"], name="proj"),
        helper.make_node("Add", ["h", "one"], ["y"], name="bias"),
    ]
    inits = [
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
        numpy_helper.from_array(np.array([-1], np.int64), "axes"),
        numpy_helper.from_array(np.eye(H, dtype=np.float32), "w"),
    ]
    graph = helper.make_graph(
        nodes,
        "shared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, H])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    converted, report = convert_precision(model, "fp16")
    assert report.fp32_nodes == ["square", "mean", "sqrt", "div", "scale"]  # Mul(x, x) too
    weights = {t.name: t.data_type for t in converted.graph.initializer}
    assert weights["one"] == TensorProto.FLOAT
    assert weights["one_fp16"] == TensorProto.FLOAT16
    assert conversion_error(model, converted, {"x": _feeds()["x"][0, :2]}) < FP16_TOL


def test_refusals_say_why():
    with pytest.raises(GraphfuseError, match="unknown dtype 'int8'"):
        convert(_ffn_block(), "int8")
    old_opset = _ffn_block()
    old_opset.opset_import[0].version = 12
    with pytest.raises(GraphfuseError, match="bf16 needs opset >= 13"):
        convert(old_opset, "bf16")


def test_input_model_is_not_modified(tmp_path):
    model = _ffn_block()
    before = model.SerializeToString()
    convert(model, "fp16")
    assert model.SerializeToString() == before
    path = tmp_path / "ffn.onnx"
    onnx.save(model, path)
    assert conversion_error(path, convert(path, "fp16"), _feeds()) < FP16_TOL
