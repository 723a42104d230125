"""onnxruntime-genai builds: the ONNX LLMs people download, made here by the real builder.

Small random Hugging Face models of several architectures (tokenizer files from SmolLM2) go
through ``python -m onnxruntime_genai.models.builder`` at fp32 and int4. graphfuse must find
every layer's FFN there (SkipSimplifiedLayerNormalization chains, MatMulNBits, GroupQueryAttention),
drop attention and fuse in the folder format, and onnxruntime-genai must generate from the
folders it writes. Numbers: the fused run against the parallel reference (the model's own ops,
every block of the run reading the run's input) in ONNX Runtime.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import LAYERS

import graphfuse
from graphfuse import genai
from graphfuse import ir as irs
from graphfuse.api import drop_attention_file, parallel_reference
from graphfuse.cli import main
from graphfuse.models import genai_build, smollm2
from graphfuse.runs import Run

# The builds (tokenizer_dir, genai_folder, dropped) are session fixtures in conftest.py.
RUN = Run(1, 4)  # attention removed in layers 2, 3, 4 (conftest.DROPPED): blocks 1..4, one run
BUILDS = [(arch, p) for arch in ("llama", "qwen2", "mistral", "gemma") for p in ("fp32", "int4")]


def _run_output(
    model: onnx.ModelProto,
    value: str,
    feeds: dict[str, np.ndarray],
    elem: int = onnx.TensorProto.FLOAT,
) -> np.ndarray:
    """``value`` (of element type ``elem``) computed by ONNX Runtime (optimisations off, so
    nothing is fused behind us)."""
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.helper.make_tensor_value_info(value, elem, None))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(
        exposed.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    assert session.get_providers() == ["CPUExecutionProvider"]
    return session.run([value], feeds)[0]


def _prefill_feeds(model: onnx.ModelProto, folder: Path, tokens: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, 49152, (1, tokens))
    return genai.prefill_feeds(folder, model, ids)


def _relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    a, e = actual.astype(np.float64), expected.astype(np.float64)
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))


def _set_accuracy_level(model: onnx.ModelProto, level: int) -> None:
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "MatMulNBits" and attr.name == "accuracy_level":
                attr.i = level


@pytest.mark.parametrize(("arch", "precision"), BUILDS)
def test_inspect_finds_every_layer(genai_folder, arch: str, precision: str) -> None:
    found = graphfuse.inspect(genai_folder(arch, precision))
    assert len(found.blocks) == LAYERS
    assert found.fusable() == []  # attention stands between every pair
    assert len(found.refusals) == LAYERS - 1
    assert all("GroupQueryAttention" in r.reason for r in found.refusals)
    if precision == "int4":
        assert all(b.down.weight.quant is not None for b in found.blocks)


@pytest.mark.parametrize(("arch", "precision"), BUILDS)
def test_drop_and_fuse_folders_generate(dropped, tmp_path: Path, arch: str, precision: str) -> None:
    folder = dropped(arch, precision)
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == LAYERS - 3
    names = {
        v.name for v in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.input
    }
    assert {f"past_key_values.{i}.key" for i in range(LAYERS - 3)} <= names
    assert f"past_key_values.{LAYERS - 3}.key" not in names  # renumbered, contiguous
    found = graphfuse.inspect(folder)
    assert [str(r) for r in found.fusable()] == [str(RUN)]

    fused = tmp_path / "fused"
    assert main(["fuse", str(folder), "--runs", str(RUN), "-o", str(fused)]) == 0
    # fp32: the wide FFN is a block again. int4: the exact form keeps per-branch gate/up
    # around one joined down projection, which is not a gated-FFN block (nor re-fusable).
    wide = 1 if precision == "fp32" else 0
    assert len(graphfuse.inspect(fused).blocks) == LAYERS - len(RUN) + wide
    assert (fused / "tokenizer.json").is_file() and (fused / "model.onnx.data").is_file()
    for model in (folder, fused):
        tokens = genai_build.generate(model, "def fibonacci(n):", max_new_tokens=6)
        assert len(tokens) == 6


# fp32: the wide MatMuls sum in another order than k separate ones. int4 at accuracy_level 4
# (the builder's CPU default) quantises each activation block of 32 to int8 with its own scale:
# the joined down projection sees the same blocks (every Iᵢ is a multiple of the block size),
# so it differs from the per-branch sum only by fp32 accumulation order, like fp32.
TOLERANCE = {"fp32": 1e-5, "int4": 1e-5}


@pytest.mark.parametrize("accuracy_level", [None, 0])
@pytest.mark.parametrize(("arch", "precision"), BUILDS)
def test_fused_run_equals_parallel_reference(
    dropped, arch: str, precision: str, accuracy_level: int | None
) -> None:
    if accuracy_level is not None and precision != "int4":
        pytest.skip("accuracy_level is a MatMulNBits attribute")
    model = onnx.load(str(dropped(arch, precision) / "model.onnx"))  # weights inline: small
    if accuracy_level is not None:
        _set_accuracy_level(model, accuracy_level)
    found = graphfuse.inspect(model)
    fused, report = graphfuse.fuse(model, [(RUN.first, RUN.last)])
    assert report.runs_fused == [str(RUN)]
    value = found.blocks[RUN.last].residual_out
    feeds = _prefill_feeds(model, dropped(arch, precision), tokens=16)
    expected = _run_output(parallel_reference(found, [RUN]), value, feeds)
    actual = _run_output(fused, value, feeds)
    assert _relative_error(actual, expected) <= TOLERANCE[precision]
    # and the approximation is not the identity: the sequential run differs
    sequential = _run_output(irs.to_proto(found.model), value, feeds)
    assert _relative_error(sequential, expected) > 10 * TOLERANCE[precision]


def test_fp16_build_fuses_within_fp16_rounding(tokenizer_dir: Path, tmp_path: Path) -> None:
    """onnxruntime-genai's builder writes fp16 models for GPUs only (``-p fp16 -e cuda``; fp16
    on the CPU is not a combination it offers), but ONNX Runtime's CPU provider runs their ops.
    Attention 2-4 removed and run 1-4 fused: the fused run equals the parallel reference within
    two fp16 steps at the largest output (2·2⁻¹⁰ relative): the wide down projection sums all ΣI
    products before rounding its output once, where the reference rounds each block's output
    and then each residual Add, so the two differ by a few roundings of values ≤ max |y|."""
    hf = genai_build.tiny_hf_folder("llama", tmp_path / "hf", tokenizer_dir, num_hidden_layers=LAYERS)  # fmt: skip
    built = genai_build.build(hf, tmp_path / "fp16", "fp16", execution_provider="cuda")
    dropped = tmp_path / "dropped"
    drop_attention_file(built, dropped, "2-4")
    model = onnx.load(str(dropped / "model.onnx"))
    found = graphfuse.inspect(model)
    assert {b.dtype for b in found.blocks} == {"float16"}
    fused, _ = graphfuse.fuse(model, [(RUN.first, RUN.last)])
    value = found.blocks[RUN.last].residual_out
    feeds = _prefill_feeds(model, dropped, tokens=16)
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    run = functools.partial(_run_output, value=value, feeds=feeds, elem=onnx.TensorProto.FLOAT16)
    expected = run(parallel_reference(found, [RUN]))
    tolerance = 2 * 2**-10
    assert _relative_error(run(fused), expected) <= tolerance
    assert (
        _relative_error(run(irs.to_proto(found.model)), expected) > 10 * tolerance
    )  # not the identity


def test_requantized_gate_up(dropped, tmp_path: Path) -> None:
    """The fast, inexact int4 form: one shared norm, gate/up γ-folded and requantised by
    onnxruntime's quantiser, the down projections joined exactly: three MatMulNBits per run.
    Close to the parallel reference, not equal to it; onnxruntime-genai generates from it."""
    model = onnx.load(str(dropped("llama", "int4") / "model.onnx"))
    found = graphfuse.inspect(model)
    exact, _ = graphfuse.fuse(model, [(RUN.first, RUN.last)])
    fast, _ = graphfuse.fuse(model, [(RUN.first, RUN.last)], requantize=True)

    def ops(m: onnx.ModelProto, op: str) -> int:
        return sum(n.op_type == op and n.name.startswith("graphfuse/") for n in m.graph.node)

    assert ops(fast, "MatMulNBits") == 3 and ops(fast, "Concat") == 0
    assert ops(exact, "MatMulNBits") == 2 * len(RUN) + 1 and ops(exact, "Concat") == 1
    # (onnx.checker refuses the builder's own output: it writes SimplifiedLayerNormalization in
    # the ONNX domain; onnxruntime and onnxruntime-genai, below, are the judges)
    value = found.blocks[RUN.last].residual_out
    feeds = _prefill_feeds(model, dropped("llama", "int4"), tokens=16)
    expected = _run_output(parallel_reference(found, [RUN]), value, feeds)
    error = _relative_error(_run_output(fast, value, feeds), expected)
    print(f"requantised gate/up: {error:.1e} relative to the parallel reference")
    assert TOLERANCE["int4"] < error < 0.05
    out = tmp_path / "fast"
    graphfuse.fuse_file(dropped("llama", "int4"), out, [(RUN.first, RUN.last)], requantize=True)
    assert len(genai_build.generate(out, "def fibonacci(n):", max_new_tokens=4)) == 4


def test_folder_without_config_is_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "model").mkdir()
    assert main(["inspect", str(tmp_path / "model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "genai_config.json" in err


def test_config_naming_a_missing_model_is_refused(genai_folder, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    config = json.loads((genai_folder("llama", "fp32") / "genai_config.json").read_text())
    config["model"]["decoder"]["filename"] = "absent.onnx"
    (folder / "genai_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert main(["fuse", str(folder), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "absent.onnx" in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_existing_output_folder_is_refused(dropped, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["fuse", str(dropped("llama", "fp32")), "--runs", str(RUN), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_blocks_that_do_not_divide_are_refused(tokenizer_dir: Path, tmp_path: Path) -> None:
    # I = 144 is not a multiple of the builder's block_size 32: the joined down projection
    # would not be exact, so the pair is refused with the reason, never dequantised.
    hf = genai_build.tiny_hf_folder(
        "llama", tmp_path / "hf", tokenizer_dir, num_hidden_layers=3, intermediate_size=144
    )
    built = genai_build.build(hf, tmp_path / "int4", "int4")
    out = tmp_path / "dropped"
    drop_attention_file(built, out, "1")
    found = graphfuse.inspect(out)
    assert len(found.blocks) == 3
    reasons = [r.reason for r in found.refusals if r.left == 0]
    assert reasons and "not a multiple of its MatMulNBits block_size 32" in reasons[0]


@pytest.fixture(scope="session")
def smollm2_int4(model_and_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M as its Hugging Face folder, built by onnxruntime-genai at int4."""
    root = tmp_path_factory.mktemp("smollm2-genai")
    smollm2.save_hf_folder(root / "hf", loaded=model_and_tokenizer)
    return genai_build.build(root / "hf", root / "int4", "int4")


@pytest.mark.slow
def test_smollm2_int4_run_equals_parallel_reference(smollm2_int4: Path, tmp_path: Path) -> None:
    """The real model: attention 25-28 removed, run 24-28 fused, at the builder's defaults."""
    found = graphfuse.inspect(smollm2_int4)
    assert len(found.blocks) == smollm2.NUM_LAYERS and found.fusable() == []
    dropped = tmp_path / "dropped"
    drop_attention_file(smollm2_int4, dropped, "25-28")
    model = onnx.load(str(dropped / "model.onnx"))
    found = graphfuse.inspect(model)
    run = Run(24, 28)
    assert str(run) in [str(r) for r in found.fusable()]
    fused, _ = graphfuse.fuse(model, [(run.first, run.last)])
    value = found.blocks[run.last].residual_out
    feeds = _prefill_feeds(model, dropped, tokens=32)
    expected = _run_output(parallel_reference(found, [run]), value, feeds)
    error = _relative_error(_run_output(fused, value, feeds), expected)
    print(f"SmolLM2 int4 run 24-28: fused vs parallel reference, relative error {error:.1e}")
    assert error <= TOLERANCE["int4"]
    fused_folder = tmp_path / "fused"
    graphfuse.fuse_file(dropped, fused_folder, [(run.first, run.last)])
    assert len(genai_build.generate(fused_folder, "def fibonacci(n):", max_new_tokens=8)) == 8


def test_ort_transformers_optimizer_output(tmp_path: Path) -> None:
    """What optimum ships for Llama-like models: ONNX Runtime's transformers optimizer
    (model_type gpt2) folds RMSNorm and residual Adds into [Skip]SimplifiedLayerNormalization."""
    from onnxruntime.transformers.optimizer import optimize_model

    from graphfuse.models.llama import BlockConfig, LlamaLike, LlamaLikeConfig, export_onnx

    on, off = BlockConfig(), BlockConfig(attention=False)
    exported = export_onnx(
        LlamaLike(LlamaLikeConfig(layers=3, blocks=(on, off, off))), tmp_path / "m.onnx"
    )
    optimized = optimize_model(
        str(exported), model_type="gpt2", num_heads=4, hidden_size=64, opt_level=0
    )
    path = tmp_path / "optimized.onnx"
    optimized.save_model_to_file(str(path))
    model = onnx.load(str(path))
    assert any(n.op_type == "SkipSimplifiedLayerNormalization" for n in model.graph.node)
    found = graphfuse.inspect(model)
    assert len(found.blocks) == 3 and [str(r) for r in found.fusable()] == ["0-2"]
    fused, _ = graphfuse.fuse(model, "all")
    value = model.graph.output[0].name  # the logits: the run ends in the final norm
    feeds = {"input_ids": np.random.default_rng(0).integers(0, 256, (1, 12)).astype(np.int64)}
    expected = _run_output(parallel_reference(found, [Run(0, 2)]), value, feeds)
    assert _relative_error(_run_output(fused, value, feeds), expected) <= TOLERANCE["fp32"]
    # (no onnx.checker here: ONNX Runtime writes SimplifiedLayerNormalization into the ONNX
    # domain, which the checker rejects in the optimizer's own output too)
