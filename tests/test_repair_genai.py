"""The repair on onnxruntime-genai builds, the builder's real output (skip-norm chains,
MatMulNBits at int4, GroupQueryAttention with a KV cache): attention of layers 2-4 removed, run
1-4 fused and refitted towards the model before the removal, fed as the runtime feeds it.
The builds are conftest.py's session fixtures, shared with tests/test_genai.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import test_genai

import graphfuse
from graphfuse import evaluate, genai, text
from graphfuse.errors import GraphfuseError
from graphfuse.models import smollm2
from graphfuse.repair import DownProjection, _cut, repair_runs

# test_genai's session fixtures, registered here too, and its run
RUN = test_genai.RUN
SEQ = 64
CALIBRATION, VALIDATION = 64, 32  # windows


@pytest.fixture(scope="module")
def windows(cache_dir: Path) -> np.ndarray:
    """Windows of SEQ tokens of real text (argparse's source), in a seeded order. On random ids
    a random model's removed attention is noise to the run (its near-uniform attention averages
    unrelated tokens): there is nothing to heal."""
    ids = text.tokenize(Path(argparse.__file__).read_text(), smollm2.load_tokenizer(cache_dir))
    windows = ids[: len(ids) // SEQ * SEQ].reshape(-1, SEQ)
    return windows[np.random.default_rng(0).permutation(len(windows))]


def _batches(folder: Path, model: onnx.ModelProto, windows: np.ndarray, size: int = 8) -> list:
    return [
        genai.prefill_feeds(folder, model, windows[i : i + size])
        for i in range(0, len(windows), size)
    ]


def _check(model: onnx.ModelProto) -> None:
    """onnx.checker (full) on ``model``. The builder writes SimplifiedLayerNormalization in the
    ONNX domain, where ONNX Runtime registers it but the checker rejects it (in the builder's
    own output too): those nodes move to com.microsoft, whose ops the checker takes on trust
    (MatMulNBits, GroupQueryAttention, …) while it checks the graph around them."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for node in copy.graph.node:
        if node.op_type == "SimplifiedLayerNormalization" and node.domain in ("", "ai.onnx"):
            node.domain = "com.microsoft"
    onnx.checker.check_model(copy, full_check=True)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_hidden_activations_give_the_fused_runs_output(
    dropped, windows: np.ndarray, precision: str
) -> None:
    """H, cut from the fused model at the run's input X (a skip norm's sum output, split off
    for the cut), and the down weight as read give the run's output: Y = X + H W2 (+ b2)."""
    folder = dropped("llama", precision)
    model = onnx.load(str(folder / "model.onnx"))
    fused, _ = graphfuse.fuse(model, [(RUN.first, RUN.last)])
    test_genai._set_accuracy_level(fused, 0)  # MatMulNBits in fp32: no int8 rounding of H
    blocks = graphfuse.inspect(model).blocks
    x, y = blocks[RUN.first].residual_in, blocks[RUN.last].residual_out
    exposed = onnx.ModelProto()
    exposed.CopyFrom(fused)
    exposed.graph.output.extend(onnx.helper.make_empty_tensor_value_info(v) for v in (x, y))
    feeds = _batches(folder, model, windows[:2], size=2)[0]
    xv, yv = _session(exposed).run([x, y], feeds)
    down = DownProjection(fused, RUN.first, RUN.last)
    h = _session(_cut(fused, {x: onnx.TensorProto.FLOAT}, [down.hidden])).run(None, {x: xv})[0]
    error = np.max(np.abs(xv + h @ down.weight() + down.bias - yv)) / np.max(np.abs(yv - xv))
    assert error <= 1e-5


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_repair_heals_a_genai_run_towards_the_model_before_removal(
    genai_folder,
    dropped,
    windows: np.ndarray,
    precision: str,
) -> None:
    folder = dropped("llama", precision)
    model = onnx.load(str(folder / "model.onnx"))
    reference = onnx.load(str(genai_folder("llama", precision) / "model.onnx"))
    # Feeds of the model, as the runtime makes them; the reference's three other caches (layers
    # 2-4 still have attention there) are made by the repair.
    calibration = _batches(folder, model, windows[:CALIBRATION])
    validation = _batches(folder, model, windows[CALIBRATION : CALIBRATION + VALIDATION])
    assert len(reference.graph.input) > len(calibration[0])
    run = (RUN.first, RUN.last)
    repaired, (fit,) = repair_runs(model, [run], calibration, validation, progress=False,
                                   reference=reference)  # fmt: skip
    print(f"{precision} run {fit.run}: validation error {fit.validation_error_fused:.3f} -> "
          f"{fit.validation_error_repaired:.3f} (λ={fit.lam:g}), requantised "
          f"{fit.validation_error_requantized}, requantisation error {fit.requantization_error}")  # fmt: skip
    assert fit.calibration_tokens == CALIBRATION * (SEQ - 1)  # first positions left out
    assert fit.validation_error_repaired < 0.9 * fit.validation_error_fused
    if precision == "int4":
        assert fit.requantization_error is not None and 0 < fit.requantization_error < 0.2
        assert fit.validation_error_requantized is not None
        assert fit.validation_error_requantized < 0.9 * fit.validation_error_fused
    else:
        assert fit.requantization_error is None and fit.validation_error_requantized is None

    # Only the joined down projection's tensors changed, each in its layout.
    fused, _ = graphfuse.fuse(model, [run])
    plain = {t.name: t for t in fused.graph.initializer}
    changed = [t for t in repaired.graph.initializer if t.raw_data != plain[t.name].raw_data]
    roles = {"weight", "scales"} if precision == "int4" else {"weight"}
    assert {t.name for t in changed} == {f"graphfuse/ffn1-4/down_{r}" for r in roles}
    for t in changed:
        assert (t.dims, t.data_type) == (plain[t.name].dims, plain[t.name].data_type)
    _check(repaired)

    # ONNX Runtime runs the repaired model from the model's own feeds.
    feeds = _batches(folder, model, windows[-2:], size=2)[0]
    logits = [_session(m).run(["logits"], feeds)[0] for m in (fused, repaired)]
    assert np.all(np.isfinite(logits[1])) and not np.allclose(logits[0], logits[1])


def test_evaluate_feeds_a_genai_decoder_as_the_runtime_does(
    dropped,
    windows: np.ndarray,
) -> None:
    """An empty KV cache of [batch, kv_heads, 0, head_size] per layer and an all-ones mask, as
    `graphfuse.genai.prefill_feeds` makes them. The builder declares the head size as a symbol
    (kv_cache_dim): without its size the feeds are refused with the reason."""
    folder = dropped("llama", "int4")
    session = evaluate.make_session(folder / "model.onnx")
    ids = windows[:3, :16]
    expected = genai.prefill_feeds(folder, onnx.load(str(folder / "model.onnx")), ids)
    past = next(arg for arg in session.get_inputs() if arg.name.startswith("past_key_values"))
    dims = {}
    if isinstance(past.shape[3], str):
        with pytest.raises(GraphfuseError, match=f"{past.name}.*{past.shape[3]}"):
            evaluate.prefill_feeds(session, ids)
        config = json.loads((folder / genai.CONFIG).read_text())
        dims = {past.shape[3]: config["model"]["decoder"]["head_size"]}
    feeds = evaluate.prefill_feeds(session, ids, dims=dims)
    assert {k: (v.shape, v.dtype) for k, v in feeds.items()} == {
        k: (v.shape, v.dtype) for k, v in expected.items()
    }
    assert all(np.array_equal(feeds[k], v) for k, v in expected.items())
    assert np.isfinite(evaluate.perplexity(session, windows[:4, :32], dims=dims, progress=False))


@pytest.mark.parametrize("precision", ["int4", "fp32"])
def test_the_linear_stand_in_starts_as_the_plain_join_and_fits_closer(
    genai_folder, dropped, windows: np.ndarray, precision: str
) -> None:
    """``heal="linear"``: the down projection reads [h, n̂(X)]. With its H extra rows at zero the
    model computes what the plain fused model does; refitted, it gets closer to the model
    before the removal than the refit over h alone, and H W still gives the run's output."""
    folder = dropped("llama", precision)
    model = onnx.load(str(folder / "model.onnx"))
    reference = onnx.load(str(genai_folder("llama", precision) / "model.onnx"))
    run = (RUN.first, RUN.last)
    plain, _ = graphfuse.fuse(model, [run])
    linear, _ = graphfuse.fuse(model, [run], linear=[run])
    down = DownProjection(linear, *run)
    hidden = graphfuse.inspect(model).blocks[0].hidden
    assert down.weight().shape == (DownProjection(plain, *run).weight().shape[0] + hidden, hidden)
    assert not down.weight()[-hidden:].any()
    for m in (plain, linear):
        test_genai._set_accuracy_level(m, 0)
    feeds = _batches(folder, model, windows[-2:], size=2)[0]
    want, got = (_session(m).run(["logits"], feeds)[0] for m in (plain, linear))
    # fp32: the same sums; int4: the join requantised once more (it was dequantised to append
    # the zero rows), which moves a weight by at most half a quantisation step
    tolerance = 1e-5 if precision == "fp32" else 2e-2
    assert np.max(np.abs(got - want)) <= tolerance * np.max(np.abs(want))

    calibration = _batches(folder, model, windows[:CALIBRATION])
    validation = _batches(folder, model, windows[CALIBRATION : CALIBRATION + VALIDATION])
    errors = {}
    for heal in (False, True):
        repaired, (fit,) = repair_runs(model, [run], calibration, validation, progress=False,
                                       reference=reference, linear=heal)  # fmt: skip
        errors[heal] = fit.validation_error_requantized or fit.validation_error_repaired
        print(f"{precision} linear={heal}: {fit.validation_error_fused:.3f} -> {errors[heal]:.3f}")
    _check(repaired)
    assert errors[True] < errors[False]


@pytest.mark.parametrize("heal", ["ffn", "linear"])
def test_cli_fuse_auto_and_heal_on_a_genai_folder(
    genai_folder, dropped, tokenizer_dir: Path, tmp_path: Path, capsys, heal: str
) -> None:
    """`graphfuse fuse FOLDER --runs auto --repair-to ORIGINAL --heal …` runs the pipeline on an
    onnxruntime-genai folder (its decoder fed as the runtime feeds it): the selection checked
    healed, the heal fitted to the folder before attention removal, a folder
    onnxruntime-genai generates from, and a plan that `apply` replays into the same model."""
    from graphfuse import plan as plans
    from graphfuse.cli import main
    from graphfuse.models import genai_build

    folder, original = dropped("llama", "fp32"), genai_folder("llama", "fp32")
    calib = tmp_path / "calib.txt"
    calib.write_text(Path(argparse.__file__).read_text())
    out, plan = tmp_path / "fused", tmp_path / "plan.json"
    argv = ["fuse", str(folder), "--runs", "auto", "--target-stages", "4", "--max-increase", "10",
            "--repair-to", str(original), "--heal", heal, "--calib", str(calib), "--tokenizer",
            str(tokenizer_dir), "--seq-len", str(SEQ), "-o", str(out), "--save-plan", str(plan),
            "--json"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["selection"]["stages_after"] <= 4 and result["runs_fused"]
    assert len(result["repairs"]) == len(result["runs_fused"])
    saved = plans.load(plan)
    assert saved.attention_removed == [2, 3, 4]
    assert [f"{r.first}-{r.last}" for r in saved.runs] == result["runs_fused"]
    assert {r.heal for r in saved.runs} <= {heal, "none"}
    assert all(r.target == "original" for r in saved.runs if r.heal != "none")
    assert len(genai_build.generate(out, "def fibonacci(n):", max_new_tokens=4)) == 4
    replayed = tmp_path / "replayed"
    assert main(["apply", str(plan), str(original), "-o", str(replayed)]) == 0
    a, b = (onnx.load(str(f / "model.onnx")) for f in (out, replayed))
    assert {t.name: t.raw_data for t in a.graph.initializer} == {
        t.name: t.raw_data for t in b.graph.initializer
    }
