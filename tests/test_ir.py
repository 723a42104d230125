"""The one graph representation (`graphfuse.ir`): the pass shape's post-condition, models onnx_ir
cannot read, and external data only from beside the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import graphfuse
from graphfuse import ir as irs
from graphfuse.errors import GraphfuseError
from graphfuse.models.synthetic import build


class _Unhook(irs.Pass):
    """A broken pass: the first MatMul's readers are left reading a value nothing computes."""

    def call(self, model: ir.Model) -> irs.Result:
        node = next(n for n in model.graph if n.op_type == "MatMul")
        model.graph.remove(node)  # not safe: its output still has readers
        return irs.Result(model, modified=True, report=None)


class _Rename(irs.Pass):
    def call(self, model: ir.Model) -> irs.Result:
        model.graph.outputs[0].name = "renamed"
        return irs.Result(model, modified=True, report=None)


@pytest.mark.parametrize(
    ("broken", "reason"),
    [(_Unhook, "before anything defines it"), (_Rename, "graph output 'renamed' is new")],
)
def test_a_pass_is_checked_after_it_runs(broken: type[irs.Pass], reason: str) -> None:
    model = irs.from_proto(build(16, [32, 32]).model)
    with pytest.raises(ir.passes.PostconditionError, match=reason):
        broken()(model)


def test_the_passes_keep_the_graph_in_order() -> None:
    """A real pass passes its own check, and the check is not vacuous on its output."""
    from graphfuse.passes.fuse_ffn import FuseFfn

    found = graphfuse.inspect(build(16, [32, 32, 32]).model)
    result = FuseFfn([found.blocks])(found.model)
    assert [r.width for r in result.report] == [96]
    assert irs.out_of_order(result.model.graph) is None
    first = next(iter(result.model.graph))
    result.model.graph.remove(first)
    assert "before anything defines it" in (irs.out_of_order(result.model.graph) or "")


def test_a_model_onnx_ir_cannot_read_is_refused_in_one_line() -> None:
    sparse = helper.make_sparse_tensor(
        helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0]),
        helper.make_tensor("i", TensorProto.INT64, [1], [0]),
        [4],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Constant", [], ["c"], sparse_value=sparse),
            helper.make_node("Add", ["x", "c"], ["y"]),
        ],
        "sparse",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
    )
    with pytest.raises(GraphfuseError) as refused:
        graphfuse.inspect(helper.make_model(graph))
    assert "Sparse tensors are not supported" in str(refused.value)
    assert "\n" not in str(refused.value)


def test_a_proto_with_data_outside_its_folder_is_refused(tmp_path: Path) -> None:
    """The API's own entry (a proto and base_dir), not only the CLI's file loading."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(32 * 32, dtype=np.float32).tobytes())
    model = build(32, [32, 32]).model
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2)
    onnx.external_data_helper.set_external_data(weight, "../secret.bin", 0, 32 * 32 * 4)
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    folder = tmp_path / "model"
    folder.mkdir()
    with pytest.raises(GraphfuseError, match="is not a plain file inside"):
        graphfuse.inspect(model, folder)


def test_save_streams_external_data_and_never_points_back(tmp_path: Path) -> None:
    """A model whose weights live in the input's data file is written with its own data file."""
    source = tmp_path / "in" / "m.onnx"
    source.parent.mkdir()
    onnx.save(build(32, [64, 64]).model, source, save_as_external_data=True, size_threshold=0)
    model = irs.load(source)
    out = tmp_path / "out" / "m.onnx"
    out.parent.mkdir()
    graphfuse.onnx_io.save(model, out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.data"]
    written = onnx.load(str(out), load_external_data=False)
    locations = {
        e.value for t in written.graph.initializer for e in t.external_data if e.key == "location"
    }
    assert locations == {"m.onnx.data"}
    for path in source.parent.iterdir():
        path.unlink()  # the output reads nothing of the input's
    onnx.checker.check_model(str(out), full_check=True)
    assert onnx.load(str(out)).graph.initializer[0].raw_data


def test_a_callers_proto_is_never_modified() -> None:
    """The IR wraps a proto's tensors without copying them: reading a Constant, inspecting,
    fusing, dropping attention, converting and checking must all leave the caller's proto as it
    was, byte for byte (Constant nodes and CastLike constants included)."""
    from graphfuse.convert import convert_precision
    from graphfuse.models.synthetic import build_spelled
    from graphfuse.passes.drop_attention import drop_attention
    from graphfuse.trt_check import check_tensorrt

    model = build_spelled("all_spellings", 16, [32, 32, 32], attention_after={0}).model
    assert any(n.op_type == "Constant" for n in model.graph.node)
    before = model.SerializeToString()
    graphfuse.inspect(model)
    graphfuse.fuse(model, "all")
    drop_attention(model, [1])
    convert_precision(model, "fp16")
    check_tensorrt(model)
    assert model.SerializeToString() == before
