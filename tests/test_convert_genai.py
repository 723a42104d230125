"""`graphfuse convert` on onnxruntime-genai folders: a complete fp16 folder that generates.

The folders are the conftest builds (a random 6-layer Llama, hidden 64, SmolLM2's tokenizer) made
by onnxruntime-genai's own builder. Numbers: first-step (prefill) outputs of the fp32 and the
fp16 model in ONNX Runtime, optimisations off, on the same tokens.

Tolerance, FP16_TOL = 3e-3 on max |a - b| / max |a| per output: every fp16 rounding (a weight,
or an activation handed between nodes) moves what it rounds by at most u/2, u = 2^-11 = 4.9e-4.
Along the path to a layer's logits or cache there are about 36 of them (6 layers × the qkv, o,
gate, up, down projections and the SiLU product; norms and the residual stream stay fp32), which
add like a random walk: √36 · u/2 ≈ 1.5e-3; the bound is twice that. Measured on this model
(6 prompts × 16, 64, 200 tokens): logits 6.0e-4 to 8.1e-4, KV cache up to 1.1e-3.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfuse import genai
from graphfuse.cli import main
from graphfuse.convert import _check, convert_precision, run_model
from graphfuse.errors import GraphfuseError
from graphfuse.models import genai_build

FP16 = TensorProto.FLOAT16
FP16_TOL = 3e-3
PROMPT_TOKENS = 64


def _prefill(folder: Path, model: Path | onnx.ModelProto) -> list[np.ndarray]:
    """Every output of a prefill of PROMPT_TOKENS seeded random tokens from an empty cache."""
    source = genai.model_file(folder)
    ids = np.random.default_rng(0).integers(0, 49152, (1, PROMPT_TOKENS))
    feeds = genai.prefill_feeds(folder, onnx.load(source, load_external_data=False), ids)
    return [np.asarray(y, np.float64) for y in run_model(model, feeds, runtime="onnxruntime")]


def _relative_errors(want: list[np.ndarray], got: list[np.ndarray]) -> list[float]:
    return [float(np.abs(a - b).max() / np.abs(a).max()) for a, b in zip(want, got, strict=True)]


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.input}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:  # Casts say what they make
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to":
                types[node.output[0]] = attribute.i
    return types


@pytest.fixture(scope="module")
def fp16_folder(genai_folder, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """`graphfuse convert FOLDER --dtype fp16 -o OUT --json` on the fp32 build: OUT and the
    summary the command printed."""
    out = tmp_path_factory.mktemp("convert") / "fp16"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["convert", str(genai_folder("llama", "fp32")), "--dtype", "fp16",
                     "-o", str(out), "--json"])  # fmt: skip
    assert code == 0
    return out, json.loads(printed.getvalue())


def test_the_fp16_folder_is_complete(genai_folder, fp16_folder) -> None:
    source, (out, _) = genai_folder("llama", "fp32"), fp16_folder
    model = genai.model_file(source).name
    # Every file but the fp32 weights (model.onnx.data): the fp16 model, half the size, is
    # written inline.
    kept = {p.name for p in source.iterdir() if not p.name.startswith(model + ".")}
    assert {p.name for p in out.iterdir()} == kept
    for name in kept - {model, genai.CONFIG}:
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    # genai_config.json is unchanged: onnxruntime-genai reads the cache and logits types from
    # the model itself (the builder's own fp16 folders carry the same config).
    config = json.loads((out / genai.CONFIG).read_text())
    assert config == json.loads((source / genai.CONFIG).read_text())
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".partial")]


def test_attention_and_the_cache_run_in_fp16_and_the_norms_in_fp32(fp16_folder) -> None:
    out, summary = fp16_folder
    model = onnx.load(str(genai.model_file(out)))
    edges = [*model.graph.input, *model.graph.output]
    io_types = {v.name: v.type.tensor_type.elem_type for v in edges}
    cache = [n for n in io_types if n.startswith(("past_key_values.", "present."))]
    assert len(cache) == 4 * 6  # past and present, key and value, 6 layers
    assert {io_types[n] for n in [*cache, "logits"]} == {FP16}
    types = _elem_types(model)
    for node in model.graph.node:
        floats = {types[n] for n in node.input if types.get(n) in (TensorProto.FLOAT, FP16)}
        if node.op_type == "GroupQueryAttention":
            # The cache and the cos/sin tables are fp16; the query then is too, as the model
            # loaded in ONNX Runtime (convert's check), which binds them all to one type T.
            assert floats == {FP16}, node.name
        if node.op_type in ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization"):
            assert floats == {TensorProto.FLOAT}, node.name  # fp32 islands, gains included
        if node.op_type == "MatMul":
            assert types[node.input[1]] == FP16, node.name
    assert summary["fp32_nodes"] == 13  # 1 + 12 norms: the graph's only fp32 nodes
    assert summary["max_relative_error"] < FP16_TOL  # the command's own 128-token check


def test_fp16_outputs_agree_with_fp32(genai_folder, fp16_folder) -> None:
    source, (out, _) = genai_folder("llama", "fp32"), fp16_folder
    want = _prefill(source, genai.model_file(source))
    got = _prefill(source, genai.model_file(out))
    assert max(_relative_errors(want, got)) < FP16_TOL  # logits and every present.* tensor
    # The bound moves each logit by at most eps, so the greedy token cannot change where the
    # fp32 margin (top-1 minus top-2) exceeds 2 eps; most positions have such a margin here
    # (measured 85-100 %), so this is not vacuous.
    logits, converted = want[0][0], got[0][0]
    eps = FP16_TOL * np.abs(logits).max()
    top2 = np.sort(logits, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 2 * eps
    assert clear.mean() > 0.75
    assert np.array_equal(logits.argmax(-1)[clear], converted.argmax(-1)[clear])


def test_onnxruntime_genai_generates_from_the_fp16_folder(fp16_folder) -> None:
    out, _ = fp16_folder
    tokens = genai_build.generate(out, "def fibonacci(n):", max_new_tokens=8)
    assert len(tokens) == 8 and all(0 <= t < 49152 for t in tokens)


def test_the_model_file_alone_keeps_fp32_inputs_and_outputs(
    genai_folder, tmp_path: Path, capsys
) -> None:
    """An .onnx file keeps fp32 I/O (Casts at the edges, so the same feeds work) even inside a
    genai folder; the command measures it on a prefill, with the cache sizes of the folder."""
    source, out = genai.model_file(genai_folder("llama", "fp32")), tmp_path / "model.onnx"
    assert main(["convert", str(source), "--dtype", "fp16", "-o", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_relative_error"] < FP16_TOL
    model = onnx.load(str(out), load_external_data=False)
    edges = [*model.graph.input, *model.graph.output]
    assert {v.type.tensor_type.elem_type for v in edges} == {TensorProto.INT64, TensorProto.FLOAT}


def test_an_int4_folder_gets_fp16_activations(genai_folder, tmp_path: Path) -> None:
    """MatMulNBits takes fp16 activations and scales (its CPU kernel has fp16); the packed
    4-bit weights are untouched. The builder's accuracy_level 4 quantises fp32 activations to
    int8 but not fp16 ones, which alone differs by about 1e-2, so the numbers are compared with
    accuracy_level 0 in both models: then only fp16 rounding remains."""
    source, out = genai_folder("llama", "int4"), tmp_path / "fp16"
    assert main(["convert", str(source), "--dtype", "fp16", "-o", str(out)]) == 0
    model = onnx.load(str(genai.model_file(out)))
    before = onnx.load(str(genai.model_file(source)))
    types = _elem_types(model)
    packed = {t.name: t for t in before.graph.initializer}
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 6 * 5 + 1  # qkv, o, gate, up and down per layer; the LM head
    for node in nbits:
        # fp16 scales; A then is fp16 too: the model loaded in ONNX Runtime, whose schema binds
        # A and scales to one type T1.
        assert types[node.input[2]] == FP16, node.name
        after = next(t for t in model.graph.initializer if t.name == node.input[1])
        assert (
            numpy_helper.to_array(after).tobytes()
            == numpy_helper.to_array(packed[node.input[1]]).tobytes()
        )
    assert len(genai_build.generate(out, "def fibonacci(n):", max_new_tokens=4)) == 4

    def exact(m: onnx.ModelProto) -> onnx.ModelProto:
        for attribute in (a for n in m.graph.node for a in n.attribute):
            if attribute.name == "accuracy_level":
                attribute.i = 0
        return m

    want, got = _prefill(source, exact(before)), _prefill(source, exact(model))
    assert max(_relative_errors(want, got)) < FP16_TOL


# -- refusals ------------------------------------------------------------------------------------


def _refused(argv: list[str], capsys, *words: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    return err


def test_a_folder_without_genai_config_is_refused(tmp_path: Path, capsys) -> None:
    folder, out = tmp_path / "model", tmp_path / "out"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    _refused(["convert", str(folder), "--dtype", "fp16", "-o", str(out)], capsys,
             "genai_config.json")  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing written


def test_an_existing_output_is_refused(genai_folder, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    source = str(genai_folder("llama", "fp32"))
    _refused(["convert", source, "--dtype", "fp16", "-o", str(out)], capsys, "already exists")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no partial folder beside it


def test_bf16_is_refused_because_onnxruntime_cannot_run_it(
    genai_folder, tmp_path: Path, capsys
) -> None:
    # ONNX Runtime's CPU provider has no bf16 MatMul (and no bf16 GroupQueryAttention): a bf16
    # folder would be a model that onnxruntime-genai cannot load.
    source, out = genai_folder("llama", "fp32"), tmp_path / "bf16"
    _refused(["convert", str(source), "--dtype", "bf16", "-o", str(out)], capsys,
             "bf16", "MatMul", "use fp16")  # fmt: skip
    assert not out.exists() and not list(tmp_path.iterdir())
    # The model file alone: bf16 is refused too, since neither onnx's checker nor its reference
    # evaluator knows the ONNX Runtime ops that would have to check or run it.
    with pytest.raises(GraphfuseError, match=r"com\.microsoft\.GroupQueryAttention.*use fp16"):
        convert_precision(genai.model_file(source), "bf16")


def test_untyped_onnxruntime_ops_are_refused_with_the_reason(genai_folder) -> None:
    """onnx's shape inference cannot type ONNX Runtime's ops: the builder's value_info does."""
    model = onnx.load(str(genai.model_file(genai_folder("llama", "fp32"))))
    del model.graph.value_info[:]
    with pytest.raises(GraphfuseError, match=r"untyped: onnx.s shape inference .* value_info"):
        convert_precision(model, "fp16")


def test_the_onnxruntime_check_catches_a_type_error_in_its_ops() -> None:
    """The post-condition for models onnx's checker cannot check: ONNX Runtime's schemas."""
    norm = helper.make_node("SkipSimplifiedLayerNormalization", ["x", "x", "gamma"], ["y"],
                            domain="com.microsoft", name="norm", epsilon=1e-5)  # fmt: skip
    graph = helper.make_graph(
        [norm],
        "norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 4])],
        [numpy_helper.from_array(np.ones(4, np.float32), "gamma")],  # fp32 gain, fp16 input
    )
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    with pytest.raises(GraphfuseError, match=r"does not load in ONNX Runtime.*bound to different"):
        _check(model, ["com.microsoft.SkipSimplifiedLayerNormalization"])
