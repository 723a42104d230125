"""No false matches: every refusal, with the reason the user reads."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import graphfuse
from graphfuse.errors import GraphfuseError
from graphfuse.models.synthetic import Variant, build


def _edit(model: onnx.ModelProto, fn) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    fn(copy.graph)
    return copy


def _chain(first: onnx.ModelProto, second: onnx.ModelProto) -> onnx.ModelProto:
    """Feed ``first``'s output straight into ``second`` (dropping a final Identity)."""
    out, into = "a/" + first.graph.output[0].name, "b/" + second.graph.input[0].name
    merged = onnx.compose.merge_models(
        onnx.compose.add_prefix(first, "a/"),
        onnx.compose.add_prefix(second, "b/"),
        io_map=[(out, into)],
    )
    identity = next(
        (n for n in merged.graph.node if n.output[0] == out and n.op_type == "Identity"), None
    )
    if identity is not None:
        merged.graph.node.remove(identity)
        for node in merged.graph.node:
            node.input[:] = [identity.input[0] if v == out else v for v in node.input]
    return merged


def test_attention_between_blocks() -> None:
    found = graphfuse.inspect(build(32, [64, 64, 64], attention_after={0}).model)
    assert [(r.left, r.reason) for r in found.refusals] == [
        (0, "attention between them (node 'attn0/softmax' (Softmax))")
    ]


def test_different_eps() -> None:
    found = graphfuse.inspect(build(32, [64, 64], eps=[1e-5, 1e-6]).model)
    assert found.fusable() == []
    assert found.refusals[0].reason == "eps differs: 1e-05 vs 1e-06"


def test_interior_value_is_a_graph_output() -> None:
    def expose(graph):
        graph.output.append(
            helper.make_tensor_value_info("block0/residual", TensorProto.FLOAT, None)
        )

    found = graphfuse.inspect(_edit(build(32, [64, 64]).model, expose))
    assert found.refusals[0].reason == "block 0's output 'block0/residual' is a graph output"


def test_interior_value_used_elsewhere() -> None:
    def tap(graph):
        graph.node.append(helper.make_node("Relu", ["block0/up/matmul"], ["tap"], name="tap"))
        graph.output.append(helper.make_tensor_value_info("tap", TensorProto.FLOAT, None))

    found = graphfuse.inspect(_edit(build(32, [64, 64, 64]).model, tap))
    assert [b.residual_add for b in found.blocks] != []
    assert len(found.blocks) == 2  # block 0 is refused as a whole
    assert (
        found.near_misses[0].reason
        == "interior value 'block0/up/matmul' also feeds node 'tap' (Relu)"
    )
    assert "a refused FFN block between them" not in found.refusals  # no pair: block 0 is gone
    assert [str(r) for r in found.fusable()] == ["0-1"]


def test_residual_feeds_something_else() -> None:
    def tap(graph):
        graph.node.append(helper.make_node("Relu", ["block0/residual"], ["tap"], name="tap"))
        graph.output.append(helper.make_tensor_value_info("tap", TensorProto.FLOAT, None))

    found = graphfuse.inspect(_edit(build(32, [64, 64]).model, tap))
    assert (
        found.refusals[0].reason
        == "block 0's output 'block0/residual' also feeds node 'tap' (Relu)"
    )


def test_weights_not_constant() -> None:
    def make_input(graph):
        w = next(t for t in graph.initializer if t.name == "block1/down/weight")
        graph.input.append(helper.make_tensor_value_info(w.name, w.data_type, list(w.dims)))

    found = graphfuse.inspect(_edit(build(32, [64, 64, 64]).model, make_input))
    assert [m.reason for m in found.near_misses] == [
        "down weight 'block1/down/weight' is not a constant initializer"
    ]
    assert found.refusals[0].reason.startswith(
        "a refused FFN block between them ('block1/residual'"
    )


def test_different_activations() -> None:
    silu = build(32, [64], variant=Variant()).model
    gelu = build(32, [64], variant=Variant(activation="gelu")).model
    found = graphfuse.inspect(_chain(silu, gelu))
    assert len(found.blocks) == 2
    assert found.refusals[0].reason == "activation differs: silu vs gelu"


def test_a_cast_between_blocks() -> None:
    a = build(32, [64], dtype="float32").model
    b = build(32, [64], dtype="float16").model
    cast = helper.make_model(
        helper.make_graph(
            [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT16, name="Cast")], "cast",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 32])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", "seq", 32])],
        ),
        opset_imports=[helper.make_opsetid("", 18)], ir_version=10,
    )  # fmt: skip
    found = graphfuse.inspect(_chain(_chain(a, cast), b))
    assert [blk.dtype for blk in found.blocks] == ["float32", "float16"]
    assert found.refusals[0].reason == "1 node(s) between them, first 'a/b/Cast' (Cast)"


def test_layernorm_is_not_rmsnorm() -> None:
    """A norm that subtracts the mean is LayerNorm: the wide FFN would be wrong, so no block."""

    def center(graph):
        for node in graph.node:
            if node.name == "block0/norm/pow":  # square (x - mean) instead of x
                node.input[0] = "centered"
        graph.node.insert(0, helper.make_node("Sub", ["x", "mu"], ["centered"], name="center"))
        graph.node.insert(0, helper.make_node("ReduceMean", ["x", "axes_last"], ["mu"], name="mu"))

    found = graphfuse.inspect(_edit(build(32, [64, 64]).model, center))
    assert len(found.blocks) == 1
    assert (
        found.near_misses[0].reason.startswith("norm has 2 normalisations")
        or "x / rms(x)" in found.near_misses[0].reason
    )


def test_no_ffn_blocks_is_an_error() -> None:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    with pytest.raises(GraphfuseError, match="no FFN blocks found"):
        graphfuse.fuse(model)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("1-2", "1-2 is not one run: blocks 1 and 2 cannot be fused (attention between them"),
        ("0-9", "0-9 names no run"),
        ("2-2", "2-2 names no run"),
        ("x-y", "'x-y' is not a block range"),
        ("0-1,1-1", "names no run"),
    ],
)
def test_bad_run_spec(spec: str, message: str) -> None:
    model = build(32, [64, 64, 64, 64], attention_after={1}).model
    with pytest.raises(GraphfuseError, match=message.replace("(", r"\(")):
        graphfuse.fuse(model, spec)


def test_mismatched_shapes_are_named() -> None:
    def shrink(graph):
        w = next(t for t in graph.initializer if t.name == "block0/up/weight")
        array = onnx.numpy_helper.to_array(w)[:, :32]
        w.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(array), w.name))

    found = graphfuse.inspect(_edit(build(32, [64]).model, shrink))
    assert found.blocks == []


def test_inspect_is_never_silent(tmp_path) -> None:
    """No block found: the output says what was looked for and why each candidate failed."""
    from graphfuse.cli import main

    def relu(graph):
        for node in graph.node:
            if node.op_type == "Sigmoid":  # x·sigmoid(x) → x·relu(x): not SiLU any more
                node.op_type = "Relu"

    model = _edit(build(64, [128, 128]).model, relu)
    assert graphfuse.inspect(model).blocks == []
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", str(path)]) == 0
    text = out.getvalue()
    assert "0 FFN blocks" in text and "looked for:" in text
    lines = [ln for ln in text.splitlines() if "the gate activation is not SiLU or GELU" in ln]
    assert len(lines) == 2  # one per layer
