"""Canonicalisation: exporters' constant spellings folded back into initializers.

Each case is a real RMSNorm + SwiGLU block with its residual, written as ONNX text, whose
constants arrive the way an exporter writes them. Checked in order: structure (what is left),
numbers (ONNX Runtime, its own optimisations off, before against after), the checker — then
the point of it all: the recogniser finds no block before and finds the block after.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.parser
import onnxruntime as ort
import pytest
from onnx import external_data_helper, numpy_helper

import graphfuse
from graphfuse import ir as irs
from graphfuse.blocks import find_blocks
from graphfuse.canonical import canonicalize
from graphfuse.models.synthetic import SPELLINGS, Variant, build_spelled, reference

H, WIDTH = 8, 16
RNG = np.random.default_rng(0)
GAIN = (1 + 0.2 * RNG.standard_normal(H)).astype(np.float32)
WEIGHTS = {
    "w_gate": (RNG.standard_normal((H, WIDTH)) / np.sqrt(H)).astype(np.float32),
    "w_up": (RNG.standard_normal((H, WIDTH)) / np.sqrt(H)).astype(np.float32),
    "w_down": (RNG.standard_normal((WIDTH, H)) / np.sqrt(WIDTH)).astype(np.float32),
}


def _floats(values: np.ndarray) -> str:
    return ", ".join(repr(float(v)) for v in values)


# One block, in graph order; each case fills in its constants (and where they are cast).
BLOCK = """
<ir_version: 10, opset_import: ["" : 18]>
block (float[batch, seq, {H}] x) => (float[batch, seq, {H}] y) {{
{constants}
    sq = Pow (x, two)
    mean = ReduceMean <keepdims = 1> (sq, axes)
{before_add}
    var = Add (mean, eps)
    rms = Sqrt (var)
    inv = Reciprocal (rms)
    normed = Mul (x, inv)
{before_gain}
    z = Mul (gain, normed)
    gate = MatMul (z, gate_w)
    sig = Sigmoid (gate)
    act = Mul (gate, sig)
    up = MatMul (z, up_w)
    h = Mul (act, up)
    down = MatMul (h, down_w)
    y = Add (x, down)
}}
"""

INITIALIZER_CONSTANTS = {
    "constants": """
    two = Constant <value = float {{2.0}}> ()
    axes = Constant <value = int64[1] {{-1}}> ()
    eps = Constant <value = float {{1e-5}}> ()
    gain = Constant <value = float[{H}] {{{gain}}}> ()
"""
}
# (a) what the dynamo exporter writes: double constants cast like the value they meet
CASTLIKE_CONSTANTS = {
    "constants": """
    two_c = Constant <value = double {{2.0}}> ()
    two = CastLike (two_c, x)
    axes = Constant <value = int64[1] {{-1}}> ()
    eps_c = Constant <value = double {{1e-5}}> ()
    gain_c = Constant <value = double[{H}] {{{gain}}}> ()
""",
    "before_add": "    eps = CastLike (eps_c, mean)",
    "before_gain": "    gain = CastLike (gain_c, normed)",
}
# (b) ReduceMean's axes computed by a Reshape of constants
RESHAPED_AXES = {
    "constants": """
    two = Constant <value = float {{2.0}}> ()
    axes_2d = Constant <value = int64[1, 1] {{-1}}> ()
    axes_shape = Constant <value = int64[1] {{1}}> ()
    axes = Reshape (axes_2d, axes_shape)
    eps = Constant <value = float {{1e-5}}> ()
    gain = Constant <value = float[{H}] {{{gain}}}> ()
"""
}
# (c) every weight read through an Identity
IDENTITY_WEIGHTS = """
    gate_w = Identity (w_gate)
    up_w = Identity (w_up)
    down_w = Identity (w_down)
"""

CASES = {
    "constant_castlike": CASTLIKE_CONSTANTS,
    "reshaped_axes": RESHAPED_AXES,
    "identity_weights": INITIALIZER_CONSTANTS,
}


def block(parts: dict[str, str], identity: bool = True) -> onnx.ModelProto:
    """The block with the constants ``parts`` spell; its weights are initializers ``w_gate``, …
    read through Identity, or ``gate_w``, … read directly."""
    fill = {"constants": "", "before_add": "", "before_gain": "", **parts}
    fill["constants"] += IDENTITY_WEIGHTS if identity else ""
    fill = {k: v.format(H=H, gain=_floats(GAIN)) for k, v in fill.items()}
    model = onnx.parser.parse_model(BLOCK.format(H=H, **fill))
    model.graph.initializer.extend(
        numpy_helper.from_array(w, n if identity else f"{n[2:]}_w") for n, w in WEIGHTS.items()
    )
    return model


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx.save(save_as_external_data=True) rewrites the model it is given: save a copy."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def session_options() -> ort.SessionOptions:
    """ONNX Runtime with its own optimisations off, and without weight prepacking: a MatMul
    prepacks an initializer but not a weight read through an Identity, and the two kernels
    round differently (1e-4 relative after 30 blocks), which is not what is tested here."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def run(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    """The model's output for ``x``; a path for a model with external data."""
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, session_options(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def probe(hidden: int, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(1).standard_normal((2, 5, hidden)).astype(dtype)


def op_types(model: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in model.graph.node}


def recognised(model: onnx.ModelProto) -> int:
    """Blocks the recogniser finds on the graph as it is (no canonicalisation)."""
    return len(find_blocks(irs.from_proto(model))[0])


@pytest.mark.parametrize("case", CASES)
def test_exported_constants_are_folded(case: str) -> None:
    model = block(CASES[case])
    onnx.checker.check_model(model, full_check=True)
    folded, report = canonicalize(model)

    # structure: no constant spelled as a node is left; the axes are an initializer
    assert not op_types(folded) & {"Constant", "CastLike", "Identity", "Reshape"}
    initializers = {t.name for t in folded.graph.initializer}
    (mean,) = (n for n in folded.graph.node if n.op_type == "ReduceMean")
    assert mean.input[1] in initializers
    assert set(WEIGHTS) <= initializers  # read through no alias any more
    assert report.nodes_before - report.nodes_after == sum(report.folded.values())
    assert report.folded["Identity"] == 3
    assert [v.name for v in folded.graph.input] == ["x"]
    assert [v.name for v in folded.graph.output] == ["y"]
    assert (folded.ir_version, folded.opset_import) == (model.ir_version, model.opset_import)

    # numbers: the same model, optimisations off
    x = probe(H)
    np.testing.assert_allclose(run(folded, x), run(model, x), rtol=0, atol=1e-6)
    onnx.checker.check_model(folded, full_check=True)

    # the recogniser: nothing before, the block after
    assert recognised(model) == 0
    found = graphfuse.inspect(folded)
    assert [(b.hidden, b.intermediate) for b in found.blocks] == [(H, WIDTH)]
    assert found.blocks[0].norm.eps == pytest.approx(1e-5)


def test_the_recogniser_says_why_before_folding() -> None:
    """The two failures of the issue, reproduced on the graphs as exported."""
    for parts, reason in ((CASTLIKE_CONSTANTS, "eps"), (RESHAPED_AXES, "Reshape")):
        model = block(parts, identity=False)
        blocks, misses = find_blocks(irs.from_proto(model))
        assert blocks == []
        assert any(reason in m.reason for m in misses), [m.reason for m in misses]


SPELLED_VARIANTS = {
    "plain": (Variant(), "float32"),
    "commuted": (Variant(commute=True), "float32"),
    "div": (Variant(norm="div"), "float32"),
    "fp16_cast_island": (Variant(cast_island=True), "float16"),
}


@pytest.mark.parametrize("variant", SPELLED_VARIANTS)
@pytest.mark.parametrize("spelling", SPELLINGS)
def test_spelled_synthetic_models_fuse_after_folding(spelling: str, variant: str) -> None:
    """`models.synthetic` spellings: folded, then found and fused exactly like `build`'s own."""
    v, dtype = SPELLED_VARIANTS[variant]
    model = build_spelled(spelling, 32, [64, 48, 64], attention_after={0}, variant=v, dtype=dtype)
    onnx.checker.check_model(model.model, full_check=True)
    folded, report = canonicalize(model.model)
    assert report.modified
    assert not op_types(folded) & {"Constant", "CastLike"}
    assert sum(n.op_type == "Identity" for n in folded.graph.node) == 1  # the graph output's
    x = probe(32, np.float16 if dtype == "float16" else np.float32)
    np.testing.assert_allclose(run(folded, x), run(model.model, x), rtol=0, atol=1e-6)
    onnx.checker.check_model(folded, full_check=True)

    assert recognised(model.model) == 0
    found = graphfuse.inspect(folded)
    assert [b.intermediate for b in found.blocks] == [64, 48, 64]
    fused, fusion = graphfuse.fuse(folded, "all")
    assert fusion.runs_fused == ["1-2"]
    expected = reference(model, x, runs=[(1, 2)])
    error = np.max(np.abs(run(fused, x) - expected)) / np.max(np.abs(expected))
    assert error < (1e-5 if dtype == "float32" else 4e-3)


def test_nothing_to_fold_is_the_same_model() -> None:
    """A model without constant nodes comes back as the same object; a transposed weight is a
    weight, not a constant to fold (it is never read)."""
    from graphfuse.models.synthetic import build

    for variant in (Variant(), Variant(weights="transpose"), Variant(stray_casts=True)):
        model = build(32, [64, 64], variant=variant).model
        before = model.SerializeToString()
        folded, report = canonicalize(model)
        assert folded is model
        assert not report.modified and report.nodes_after == report.nodes_before
        assert model.SerializeToString() == before


def test_external_weights_stay_external(tmp_path) -> None:
    """Weights saved as external data are neither read nor moved: each initializer keeps its
    location, offset and length, and the folded model runs from the same data file."""
    spelled = build_spelled("all_spellings", 32, [64, 64])
    path = tmp_path / "model.onnx"
    onnx.save(_copy(spelled.model), path, save_as_external_data=True, size_threshold=0,
              location="model.onnx.data")  # fmt: skip
    model = onnx.load(path, load_external_data=False)
    where = {
        t.name: [(e.key, e.value) for e in t.external_data]
        for t in model.graph.initializer
        if external_data_helper.uses_external_data(t)
    }
    assert len(where) == len(model.graph.initializer) > 0

    folded, report = canonicalize(model, tmp_path)
    assert report.folded["Identity"] == 6
    for tensor in folded.graph.initializer:
        if tensor.name in where:
            assert tensor.data_location == onnx.TensorProto.EXTERNAL
            assert [(e.key, e.value) for e in tensor.external_data] == where[tensor.name]
    weights = [n for n in where if n.endswith("/weight")]
    assert len(weights) == 6 and set(weights) <= {t.name for t in folded.graph.initializer}

    out = tmp_path / "folded.onnx"  # beside the data file it reads
    onnx.save(folded, out)
    x = probe(32)
    np.testing.assert_allclose(run(str(out), x), run(spelled.model, x), rtol=0, atol=1e-6)
    assert len(graphfuse.inspect(folded, tmp_path).blocks) == 2


def test_weights_are_never_read(tmp_path) -> None:
    """With its data file gone, a model whose constants to fold are aliases of weights still
    folds: no weight byte is ever read."""
    spelled = build_spelled("identity_weights", 32, [64, 64])
    path = tmp_path / "model.onnx"
    onnx.save(_copy(spelled.model), path, save_as_external_data=True, size_threshold=0,
              location="model.onnx.data")  # fmt: skip
    model = onnx.load(path, load_external_data=False)
    (tmp_path / "model.onnx.data").unlink()
    folded, report = canonicalize(model, tmp_path)
    assert report.folded == {"Identity": 6}
    assert all(external_data_helper.uses_external_data(t) for t in folded.graph.initializer)


def test_small_external_constants_are_read_from_base_dir(tmp_path) -> None:
    """An eps stored as external data is folded when the data can be found (``base_dir``) and
    left as it is when it cannot."""
    constants = CASTLIKE_CONSTANTS["constants"].replace(
        "    eps_c = Constant <value = double {{1e-5}}> ()\n", ""
    )
    model = block({**CASTLIKE_CONSTANTS, "constants": constants})
    model.graph.initializer.append(numpy_helper.from_array(np.array(1e-5), "eps_c"))
    path = tmp_path / "model.onnx"
    onnx.save(_copy(model), path, save_as_external_data=True, size_threshold=0,
              location="model.onnx.data")  # fmt: skip
    stored = onnx.load(path, load_external_data=False)

    folded, report = canonicalize(stored, tmp_path)
    assert report.folded["CastLike"] == 3
    assert "eps_c" not in {t.name for t in folded.graph.initializer}  # read, folded, gone
    (eps,) = (t for t in folded.graph.initializer if t.name == "eps")
    assert numpy_helper.to_array(eps) == np.float32(1e-5)
    onnx.save(folded, tmp_path / "folded.onnx")
    x = probe(H)
    np.testing.assert_allclose(run(str(tmp_path / "folded.onnx"), x), run(model, x), atol=0)

    unread, report = canonicalize(stored)  # no base_dir: the data cannot be found
    assert report.folded["CastLike"] == 2
    assert any(n.op_type == "CastLike" and n.output[0] == "eps" for n in unread.graph.node)


def test_custom_domains_pass_through() -> None:
    """com.microsoft nodes are untouched; a CastLike whose target type nothing can infer (the
    output of a contrib op) is left, with the reason."""
    model = onnx.parser.parse_model(f"""
    <ir_version: 9, opset_import: ["" : 17, "com.microsoft" : 1]>
    skipnorm (float[batch, seq, {H}] x, float[batch, seq, {H}] skip) => (float[batch, seq, {H}] y) {{
        gain_c = Constant <value = double[{H}] {{{_floats(GAIN)}}}> ()
        gain = CastLike (gain_c, x)
        normed, , , total = com.microsoft.SkipSimplifiedLayerNormalization <epsilon = 1e-5> (x, skip, gain)
        half_c = Constant <value = double {{0.5}}> ()
        half = CastLike (half_c, normed)
        scaled = Mul (normed, half)
        y = Add (scaled, total)
    }}
    """)  # fmt: skip
    folded, report = canonicalize(model)
    contrib = [n for n in model.graph.node if n.domain == "com.microsoft"]
    assert [n for n in folded.graph.node if n.domain == "com.microsoft"] == contrib
    assert report.folded == {"Constant": 2, "CastLike": 1}
    assert any("CastLike 'half'" in k and "unknown" in k for k in report.kept)
    assert (folded.ir_version, folded.opset_import) == (9, model.opset_import)

    feeds = {"x": probe(H), "skip": probe(H) * 0.5}
    outputs = [
        ort.InferenceSession(
            m.SerializeToString(), session_options(), providers=["CPUExecutionProvider"]
        ).run(None, feeds)[0]
        for m in (folded, model)
    ]
    np.testing.assert_allclose(*outputs, rtol=0, atol=1e-6)


def test_what_the_folder_keeps_is_reported() -> None:
    """onnxscript keeps ConstantOfShape (it would only grow the model): it stays, reading the
    lifted shape, and the report says so."""
    model = onnx.parser.parse_model(f"""
    <ir_version: 10, opset_import: ["" : 18]>
    ones (float[batch, {H}] x) => (float[batch, {H}] y) {{
        shape = Constant <value = int64[1] {{{H}}}> ()
        ones = ConstantOfShape <value = float[1] {{1.0}}> (shape)
        y = Add (x, ones)
    }}
    """)
    folded, report = canonicalize(model)
    assert [n.op_type for n in folded.graph.node] == ["ConstantOfShape", "Add"]
    assert report.folded == {"Constant": 1}
    assert any(k.startswith("ConstantOfShape 'ones'") for k in report.kept)
    x = np.random.default_rng(2).standard_normal((3, H)).astype(np.float32)
    np.testing.assert_allclose(run(folded, x), run(model, x), rtol=0, atol=0)
    onnx.checker.check_model(folded, full_check=True)


def test_in_place_edits_the_given_model() -> None:
    model = block(CASES["constant_castlike"])
    copy = _copy(model)
    folded, _ = canonicalize(copy, in_place=True)
    assert folded is copy and "CastLike" not in op_types(copy)
    untouched, _ = canonicalize(model)
    assert untouched is not model and "CastLike" in op_types(model)


def test_an_out_of_order_graph_is_left_as_it_is() -> None:
    """ONNX graphs are topologically sorted; one that is not is left alone, with the reason."""
    model = block(CASES["constant_castlike"])
    nodes = list(model.graph.node)
    cast = next(n for n in nodes if n.output[0] == "eps")  # move it to the top
    del model.graph.node[:]
    model.graph.node.extend([cast, *(n for n in nodes if n is not cast)])
    folded, report = canonicalize(model)
    assert folded is model and not report.modified
    assert "out of order (CastLike 'eps' reads" in report.notes[0]
