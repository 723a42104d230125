"""The fusion pass on synthetic graphs: structure, numbers, checker — for every exporter variant.

Numbers: the fused model against the parallel reference X + Σ FFNᵢ(nᵢ(X)) computed in float64
NumPy from the weights the builder drew (`graphfuse.models.synthetic.reference`), through ONNX
Runtime with its graph optimisations off and fully on.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import graphfuse
from graphfuse.models.synthetic import Variant, build, reference
from graphfuse.passes.fuse_ffn import gain_of

# fp32: 1e-5 of the output's largest magnitude (the bound). fp16 and bf16: the fused and
# the original graphs round differently (γ folded into weights before rounding, one wide
# accumulation instead of k) — a few units of the format's epsilon (2^-11, 2^-8) on the output.
TOLERANCE = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3e-2}

VARIANTS = {
    "plain": Variant(),
    "div_and_square_by_mul": Variant(norm="div", square="mul"),
    "commuted": Variant(commute=True),
    "transpose_weights": Variant(weights="transpose"),
    "gemm_transB_with_bias": Variant(weights="gemm", bias=True),
    "reshape_wrapped": Variant(weights="reshape"),
    "biases": Variant(bias=True),
    "split_gate_first": Variant(gate_up="split_gate_first"),
    "split_up_first": Variant(gate_up="split_up_first"),
    "slice_gate_first": Variant(gate_up="slice_gate_first"),
    "slice_up_first_bias": Variant(gate_up="slice_up_first", bias=True),
    "swish_op": Variant(activation="swish"),
    "gelu_erf": Variant(activation="gelu"),
    "gelu_tanh": Variant(activation="gelu_tanh"),
    "gelu_op": Variant(activation="gelu_op"),
    "gelu_tanh_op": Variant(activation="gelu_tanh_op"),
    "rmsnorm_op": Variant(norm="rmsnorm_op"),
    "simplified_layernorm": Variant(norm="simplified"),
    "stray_casts": Variant(stray_casts=True),
    "shared_gain": Variant(shared_gain=True),
    "cast_island": Variant(cast_island=True),
}


def run(model: onnx.ModelProto, x: np.ndarray, optimize: bool = False) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    assert session.get_providers() == ["CPUExecutionProvider"]
    return session.run(None, {"x": x})[0]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    actual, expected = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def probe(hidden: int, dtype: str = "float32", seed: int = 1) -> np.ndarray:
    from graphfuse.models.synthetic import DTYPES

    x = np.random.default_rng(seed).standard_normal((2, 5, hidden))
    return x.astype(DTYPES[dtype][0])


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_is_found_fused_and_exact(name: str) -> None:
    variant = VARIANTS[name]
    model = build(64, [128, 96, 128, 64, 32], attention_after={1}, variant=variant)

    # structure: 5 blocks, attention splits them into runs 0-1 and 2-4
    found = graphfuse.inspect(model.model)
    assert [b.intermediate for b in found.blocks] == [128, 96, 128, 64, 32]
    assert [str(r) for r in found.fusable()] == ["0-1", "2-4"]
    assert "attention between them" in found.refusals[0].reason
    fused, report = graphfuse.fuse(model.model, "all")
    packed, _ = graphfuse.fuse(model.model, "all", pack=True)
    assert report.runs_fused == ["0-1", "2-4"]
    assert report.widths == [224, 224]
    assert (report.depth_before.ffn_stages, report.depth_after.ffn_stages) == (5, 2)
    assert report.depth_after.gemms < report.depth_before.gemms
    after = graphfuse.inspect(fused)
    assert [b.intermediate for b in after.blocks] == [224, 224]
    for block in after.blocks:  # the gains were folded into the weights
        assert np.all(gain_of(after.model.graph.initializers, block) == 1)
    assert all(n.doc_string.startswith("graphfuse.fuse_ffn") for n in fused.graph.node
               if n.name.startswith("graphfuse/"))  # fmt: skip

    # numbers: exact against the independent parallel reference, optimisations off and on
    x = probe(64)
    expected = reference(model, x, runs=[(0, 1), (2, 4)])
    for optimize in (False, True):
        assert relative_error(run(fused, x, optimize), expected) < TOLERANCE["float32"]
        assert relative_error(run(packed, x, optimize), expected) < TOLERANCE["float32"]
    assert sum(n.op_type == "Split" for n in packed.graph.node) >= 2
    # and the approximation is real: the fused model is not the sequential one
    assert relative_error(run(fused, x), reference(model, x)) > 1e-3

    # checker (SimplifiedLayerNormalization is ONNX Runtime's, unknown to the checker)
    if variant.norm != "simplified":
        onnx.checker.check_model(fused, full_check=True)


def test_outside_the_runs_is_untouched() -> None:
    model = build(64, [128, 128, 128, 128], attention_after={1}).model
    fused, _ = graphfuse.fuse(model, "2-3")
    kept = [n for n in fused.graph.node if not n.name.startswith("graphfuse/")]
    original = {n.name: n for n in model.graph.node}
    for node in kept:
        assert node == original[node.name]
    assert {n.name for n in kept} >= {
        n.name for n in model.graph.node if n.name.startswith(("block0", "block1", "attn1"))
    }
    assert fused.graph.input == model.graph.input
    assert fused.graph.output == model.graph.output
    before = {t.name: t for t in model.graph.initializer}
    for tensor in fused.graph.initializer:
        if tensor.name in before:
            assert tensor == before[tensor.name]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("cast_island", [True, False])
def test_half_precision(dtype: str, cast_island: bool) -> None:
    model = build(64, [128, 96, 128], variant=Variant(cast_island=cast_island), dtype=dtype)
    fused, report = graphfuse.fuse(model.model)
    assert report.runs_fused == ["0-2"]
    onnx.checker.check_model(fused, full_check=True)
    x = probe(64, dtype)
    expected = reference(model, x, runs=[(0, 2)])
    if dtype == "float16":
        actual = run(fused, x)
    else:  # ONNX Runtime's CPU kernels have no bf16 MatMul: use ONNX's reference evaluator
        from onnx.reference import ReferenceEvaluator

        actual = ReferenceEvaluator(fused).run(None, {"x": x})[0]
    assert actual.dtype == x.dtype
    assert relative_error(actual, expected) < TOLERANCE[dtype]


def test_keep_last_and_max_run_length() -> None:
    model = build(32, [64] * 7).model
    found = graphfuse.inspect(model)
    assert [str(r) for r in found.fusable()] == ["0-6"]
    _, report = graphfuse.fuse(model, "all", keep_last=True)
    assert report.runs_fused == ["0-5"]
    _, report = graphfuse.fuse(model, "all", max_run_length=3)
    assert report.runs_fused == ["0-2", "3-5"]  # the last piece, block 6 alone, stays
    _, report = graphfuse.fuse(model, "all", max_run_length=3, keep_last=True)
    assert report.runs_fused == ["0-1", "3-4"]
    _, report = graphfuse.fuse(model, "1-3,5-6")
    assert report.runs_fused == ["1-3", "5-6"]
    assert report.depth_after.ffn_stages == 7 - 2 - 1


def test_fusing_twice_is_stable() -> None:
    """A fused model is inspected like any other: its wide FFN is a block with unit gain."""
    model = build(32, [64, 64, 64, 64])
    fused, _ = graphfuse.fuse(model.model, "0-1")
    assert [b.intermediate for b in graphfuse.inspect(fused).blocks] == [128, 64, 64]
    again, report = graphfuse.fuse(fused)
    assert report.runs_fused == ["0-2"]
    x = probe(32)
    assert relative_error(run(again, x), reference(model, x, runs=[(0, 3)])) < 1e-5


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.sampled_from([8, 24, 64]),
    widths=st.lists(st.sampled_from([8, 16, 40, 96]), min_size=2, max_size=5),
    variant=st.sampled_from(sorted(VARIANTS)),
    dtype=st.sampled_from(["float32", "float16"]),
    seed=st.integers(0, 2**16),
)
def test_property_fused_equals_parallel_reference(hidden, widths, variant, dtype, seed) -> None:
    variant = VARIANTS[variant]
    if dtype != "float32" and variant.stray_casts:
        dtype = "float32"
    model = build(hidden, widths, variant=variant, dtype=dtype, seed=seed)
    fused, report = graphfuse.fuse(model.model)
    assert report.runs_fused == [f"0-{len(widths) - 1}"]
    x = probe(hidden, dtype, seed)
    expected = reference(model, x, runs=[(0, len(widths) - 1)])
    assert relative_error(run(fused, x), expected) < TOLERANCE[dtype]


# The families onnxruntime-genai's builder writes, node by node: the SkipSimplifiedLayerNormalization
# chain (a block's residual Add in the next block's norm) and MatMulNBits projections (quantised
# by onnxruntime's quantiser; the reference computes with the dequantised weights).
FAMILIES = {
    "skip_norm_chain": Variant(norm="skip"),
    "nbits4": Variant(weights="nbits"),
    "nbits4_zero_points_block32": Variant(weights="nbits", zero_points=True, block_size=32),
    "nbits8": Variant(weights="nbits", bits=8),
    "skip_chain_nbits4_zero_points": Variant(norm="skip", weights="nbits", zero_points=True),
}


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hidden=st.sampled_from([32, 64]),
    widths=st.lists(st.sampled_from([32, 64, 96]), min_size=2, max_size=5),
    family=st.sampled_from(sorted(FAMILIES)),
    seed=st.integers(0, 2**16),
)
def test_property_builder_families_fuse_exactly(hidden, widths, family, seed) -> None:
    """Widths are multiples of the block size (32 at most): the down projections join along K."""
    model = build(hidden, widths, variant=FAMILIES[family], seed=seed)
    fused, report = graphfuse.fuse(model.model)
    assert report.runs_fused == [f"0-{len(widths) - 1}"]
    x = probe(hidden, "float32", seed)
    expected = reference(model, x, runs=[(0, len(widths) - 1)])
    for optimize in (False, True):
        assert relative_error(run(fused, x, optimize), expected) < TOLERANCE["float32"]


def test_graphsurgeon_graph_round_trip() -> None:
    """TensorRT-side pipelines hold onnx-graphsurgeon Graphs: one in, one out, still exact."""
    import onnx_graphsurgeon as gs

    synthetic = build(64, [128, 96, 128], attention_after=set())
    graph = gs.import_onnx(synthetic.model)
    assert len(graphfuse.inspect(graph).blocks) == 3
    fused, report = graphfuse.fuse(graph, "all")
    assert isinstance(fused, gs.Graph) and report.runs_fused == ["0-2"]
    model = gs.export_onnx(fused)
    onnx.checker.check_model(model, full_check=True)
    x = probe(64)
    expected = reference(synthetic, x.astype(np.float64), [(0, 2)])
    assert relative_error(run(model, x), expected) <= TOLERANCE["float32"]
