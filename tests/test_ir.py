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


def test_a_fused_model_fuses_again_under_fresh_names() -> None:
    """Fusing in stages: block numbers shift after a fusion, so a second run may be numbered
    like the first one; its weights get names of their own and the result equals its parallel
    reference."""
    from graphfuse.api import parallel_reference
    from graphfuse.runs import Run

    model = build(16, [32, 32, 32, 32], seed=3).model
    once, _ = graphfuse.fuse(model, "0-1")
    twice, report = graphfuse.fuse(once, "0-1")
    assert report.widths == [96]
    onnx.checker.check_model(twice, full_check=True)
    prefixes = {t.name.rpartition("/")[0] for t in twice.graph.initializer}
    assert "graphfuse/ffn0-1#2" in prefixes
    x = np.random.default_rng(0).standard_normal((1, 5, 16)).astype(np.float32)
    reference = parallel_reference(graphfuse.inspect(once), [Run(0, 1)])
    np.testing.assert_allclose(_run(twice, x), _run(reference, x), rtol=1e-5, atol=1e-5)


def test_nothing_fused_leaves_every_node_even_dead_ones() -> None:
    model = build(16, [32, 32]).model
    model.graph.node.append(helper.make_node("Neg", ["x"], ["unused"], name="dead"))
    fused, report = graphfuse.fuse(model, "all", keep_last=True)
    assert report.notes and report.nodes_before == report.nodes_after == len(model.graph.node)
    assert "dead" in {n.name for n in fused.graph.node}


def test_skip_norms_come_back_as_the_builder_wrote_them(capfd) -> None:
    """Skip norms are joined back with their outputs named as before (the unused mean and
    inverse-std outputs unnamed), and the passes log nothing, even after onnxruntime's quantiser
    turned logging on (it calls basicConfig on import)."""
    import onnxruntime.quantization.matmul_nbits_quantizer  # noqa: F401

    from graphfuse.models.synthetic import Variant

    variant = Variant(norm="skip", weights="nbits")
    model = build(32, [64, 64, 64, 64], variant=variant).model
    before = {n.name: list(n.output) for n in model.graph.node if n.op_type.startswith("Skip")}
    assert before
    capfd.readouterr()
    fused, _ = graphfuse.fuse(model, "1-2")
    assert capfd.readouterr().err == ""
    after = {n.name: list(n.output) for n in fused.graph.node if n.op_type.startswith("Skip")}
    # block 2's norm is now a branch of the run (on the run's input: no skip), block 1's feeds
    # branch 0, and block 3's, just after the run, reads the run's input and the wide FFN
    assert after.keys() == before.keys() - {"block2/norm/skip_rms"}
    for outputs in after.values():
        assert outputs[1:3] == ["", ""], outputs
    assert after["block1/norm/skip_rms"][3] == before["block1/norm/skip_rms"][3]
    assert after["block3/norm/skip_rms"] == before["block3/norm/skip_rms"]


def test_drop_report_counts_the_nodes_given() -> None:
    from graphfuse.models.synthetic import build_spelled
    from graphfuse.passes.drop_attention import drop_attention

    model = build_spelled("constant_castlike", 16, [32, 32], attention_after={0}).model
    _, report = drop_attention(model, [1])
    assert report.nodes_before == len(model.graph.node)


def test_check_reads_a_graph_without_its_data_file(tmp_path: Path) -> None:
    from graphfuse.trt_check import check_tensorrt

    path = tmp_path / "m.onnx"
    onnx.save(build(16, [32, 32]).model, path, save_as_external_data=True, size_threshold=0,
              all_tensors_to_one_file=True, location="m.onnx.data")  # fmt: skip
    (tmp_path / "m.onnx.data").unlink()
    assert check_tensorrt(path) == []


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]
