"""The repair maths on cases with a known least-squares answer, then on a fused model: its
hidden activations, its down weight read and written in every format (float, MatMulNBits), the
fit. onnxruntime-genai builds: tests/test_repair_genai.py."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphfuse
from graphfuse import nbits
from graphfuse.blocks import Quant
from graphfuse.errors import GraphfuseError
from graphfuse.models.synthetic import BlockWeights, Variant, act, build, reference
from graphfuse.repair import (
    DownProjection,
    RidgeAccumulator,
    _cut,
    down_weight,
    fit,
    repair_runs,
    set_down_weight,
)


def _feeds(rng: np.random.Generator, count: int, batch: int) -> list[dict[str, np.ndarray]]:
    """``count`` feeds of ``batch`` windows of 16 positions of the synthetic models' input x."""
    return [{"x": rng.standard_normal((batch, 16, 32)).astype(np.float32)} for _ in range(count)]


def _data(seed: int, n: int = 600, w: int = 12, d: int = 5):
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((n, w))
    true = rng.standard_normal((w, d))
    return h, true, h @ true + 0.01 * rng.standard_normal((n, d))


def test_batches_add_up_to_the_whole() -> None:
    h, _, t = _data(0)
    whole, parts = RidgeAccumulator(12, 5), RidgeAccumulator(12, 5)
    whole.add(h, t)
    for k in range(0, 600, 64):
        parts.add(h[k : k + 64], t[k : k + 64])
    np.testing.assert_allclose(parts.hth, whole.hth, rtol=1e-12)
    np.testing.assert_allclose(parts.hty, whole.hty, rtol=1e-12)
    assert parts.rows == 600


def test_ridge_equals_the_augmented_least_squares_problem() -> None:
    h, _, t = _data(1)
    prior = np.random.default_rng(2).standard_normal((12, 5))
    acc = RidgeAccumulator(12, 5)
    acc.add(h, t)
    lam = 0.3
    s = np.mean(np.sum(h * h, axis=0))
    # min ‖HW − T‖² + λs‖W − P‖²  ⇔  least squares on [H; √(λs) I] W = [T; √(λs) P]
    a = np.vstack([h, np.sqrt(lam * s) * np.eye(12)])
    b = np.vstack([t, np.sqrt(lam * s) * prior])
    expected = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(acc.solve(prior, lam), expected, rtol=1e-9, atol=1e-12)
    # the loss from the sums equals the loss computed from the rows
    w = acc.solve(prior, lam)
    direct = np.sum((h @ w - t) ** 2) / np.sum(t**2)
    assert abs(acc.loss(w) - direct) < 1e-12


def test_small_lambda_recovers_the_true_map_and_validation_picks_it() -> None:
    h, true, t = _data(3)
    cal, val = RidgeAccumulator(12, 5), RidgeAccumulator(12, 5)
    cal.add(h[:400], t[:400])
    val.add(h[400:], t[400:])
    w, lam, errors = fit(cal, val, prior=np.zeros((12, 5)), lambdas=(1e-6, 1e-1, 10.0))
    assert lam == 1e-6  # noise is tiny: the data, not the (wrong) prior, should win
    np.testing.assert_allclose(w, true, atol=5e-3)
    assert errors[10.0] > errors[1e-6]


def test_large_lambda_keeps_the_prior_when_data_is_noise() -> None:
    rng = np.random.default_rng(4)
    h = rng.standard_normal((60, 40))
    prior = rng.standard_normal((40, 3))
    t = h @ prior + 3.0 * rng.standard_normal((60, 3))  # few rows, much noise: over-fitting
    cal, val = RidgeAccumulator(40, 3), RidgeAccumulator(40, 3)
    cal.add(h[:30], t[:30])
    val.add(h[30:], t[30:])
    _, lam, _ = fit(cal, val, prior)
    assert lam >= 1.0


def test_repair_of_fused_runs_moves_towards_the_sequential_model() -> None:
    model = build(32, [64] * 6, seed=3)
    rng = np.random.default_rng(0)
    calibration = _feeds(rng, 8, 4)
    validation = _feeds(rng, 4, 4)
    repaired, results = repair_runs(model.model, [(0, 2), (3, 5)], calibration, validation,
                                    progress=False)  # fmt: skip
    assert [r.run for r in results] == ["0-2", "3-5"]
    for r in results:
        assert r.validation_error_repaired < r.validation_error_fused
        assert r.calibration_tokens == 8 * 4 * 15  # each window's first token is left out
    fused, _ = graphfuse.fuse(model.model, [(0, 2), (3, 5)])
    # only the down weights differ between the fused and the repaired model
    a = {t.name: t for t in fused.graph.initializer}
    changed = [t.name for t in repaired.graph.initializer if a[t.name].raw_data != t.raw_data]
    assert sorted(changed) == ["graphfuse/ffn0-2/down_weight", "graphfuse/ffn3-5/down_weight"]
    x = rng.standard_normal((2, 16, 32)).astype(np.float32)
    sequential = reference(model, x)

    def error(m):
        y = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        return np.linalg.norm(y - sequential) / np.linalg.norm(sequential)

    assert error(repaired) < error(fused)


def test_cached_fits_are_reused_and_equal_fresh_ones() -> None:
    model = build(32, [64] * 6, seed=5)
    rng = np.random.default_rng(1)
    calibration = _feeds(rng, 4, 2)
    validation = _feeds(rng, 2, 2)
    cache: dict = {}
    _, first = repair_runs(model.model, [(0, 2)], calibration, validation, progress=False,
                           cache=cache)  # fmt: skip
    both, results = repair_runs(model.model, [(0, 2), (3, 5)], calibration, validation,
                                progress=False, cache=cache)  # fmt: skip
    assert sorted(cache) == [(0, 2), (3, 5)] and results[0] is first[0]
    fresh, _ = repair_runs(model.model, [(0, 2), (3, 5)], calibration, validation, progress=False)
    weights = {t.name: t.raw_data for t in fresh.graph.initializer}
    assert all(weights[t.name] == t.raw_data for t in both.graph.initializer)


def test_the_first_position_is_left_out_of_the_fit() -> None:
    """A huge contribution at position 0 (an attention sink's massive activation) must not
    steer the fit: with it made 1000× larger the fitted weights do not change."""
    model = build(32, [64] * 3, seed=6)
    rng = np.random.default_rng(2)
    calibration = _feeds(rng, 4, 2)
    validation = _feeds(rng, 2, 2)
    loud = [{"x": f["x"].copy()} for f in calibration]
    for f in loud:
        f["x"][:, 0] *= 1000.0
    a, _ = repair_runs(model.model, [(0, 2)], calibration, validation, progress=False)
    b, _ = repair_runs(model.model, [(0, 2)], loud, validation, progress=False)
    wa, wb = ({t.name: t.raw_data for t in m.graph.initializer} for m in (a, b))
    assert wa["graphfuse/ffn0-2/down_weight"] == wb["graphfuse/ffn0-2/down_weight"]


def test_repair_against_a_reference_model_fits_the_reference() -> None:
    """With ``reference`` the targets come from that model (e.g. the one before attention was
    removed): the repaired run moves towards the reference's output, not the model's."""
    model, other = build(32, [64] * 3, seed=8), build(32, [64] * 3, seed=9)
    rng = np.random.default_rng(4)
    calibration = _feeds(rng, 8, 4)
    validation = _feeds(rng, 4, 4)
    plain, _ = repair_runs(model.model, [(0, 2)], calibration, validation, progress=False)
    healed, _ = repair_runs(model.model, [(0, 2)], calibration, validation, progress=False,
                            reference=other.model)  # fmt: skip
    x = rng.standard_normal((2, 16, 32)).astype(np.float32)

    def run(m):
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return s.run(None, {"x": x})[0]

    target = reference(other, x)
    assert np.linalg.norm(run(healed) - target) < 0.9 * np.linalg.norm(run(plain) - target)
    with pytest.raises(GraphfuseError, match="FFN blocks"):
        repair_runs(model.model, [(0, 2)], calibration, validation, progress=False,
                    reference=build(32, [64] * 4, seed=9).model)  # fmt: skip


def _hidden(w: BlockWeights, x: np.ndarray, activation: str) -> np.ndarray:
    """act(n(x) W1 + b1) ⊙ (n(x) W3 + b3) of one block, in float64."""
    f = lambda a: 0.0 if a is None else a.astype(np.float64)  # noqa: E731
    x = x.astype(np.float64)
    z = f(w.gain) * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + w.eps)
    return act(activation, z @ f(w.gate) + f(w.gate_bias)) * (z @ f(w.up) + f(w.up_bias))


def test_hidden_activations_are_what_the_wide_ffn_computes() -> None:
    """H, the input of each fused down projection, comes from ONNX Runtime on the fused model cut
    at the runs' inputs X; it equals [H₁ | … | Hₖ], each block's own hidden activations on X."""
    model = build(32, [64, 48, 64, 32, 64], variant=Variant(bias=True), seed=7)
    runs = [(0, 2), (3, 4)]
    fused, _ = graphfuse.fuse(model.model, runs)
    blocks = graphfuse.inspect(model.model).blocks
    inputs = [blocks[a].residual_in for a, _ in runs]
    hidden = [DownProjection(fused, a, b).hidden for a, b in runs]
    cut = _cut(fused, dict.fromkeys(inputs, TensorProto.FLOAT), hidden)
    assert "graphfuse/ffn0-2/residual" not in {n.name for n in cut.graph.node}  # 3-4's X: fed
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((2, 16, 32)).astype(np.float32) for _ in runs]  # any X, each run
    session = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"])
    for (a, b), x, h in zip(
        runs, xs, session.run(None, dict(zip(inputs, xs, strict=True))), strict=True
    ):
        expected = np.concatenate(
            [_hidden(model.blocks[i], x, model.activation) for i in range(a, b + 1)], axis=-1
        )
        assert np.max(np.abs(h - expected)) <= 1e-5 * np.max(np.abs(expected))


def test_a_cut_needing_more_than_the_run_inputs_is_refused() -> None:
    model = build(32, [64] * 3, seed=1)
    fused, _ = graphfuse.fuse(model.model, [(1, 2)])
    hidden = [DownProjection(fused, 1, 2).hidden]
    with pytest.raises(GraphfuseError, match="not provided: x"):  # block 1's input was not given
        _cut(fused, {}, hidden)
    with pytest.raises(GraphfuseError, match="'nowhere' is not a value"):
        _cut(fused, {"nowhere": TensorProto.FLOAT}, hidden)
    with pytest.raises(GraphfuseError, match="no fused run 0-1"):
        DownProjection(fused, 0, 1)


def _nbits_down(zero_points: str | None, flat: bool, k: int = 64, n: int = 32) -> onnx.ModelProto:
    """A fused run's down projection alone, y = MatMulNBits(h) with 4-bit blocks of 16 along K:
    no zero points, uint8-packed ones, or ones in the scales' type; scales [N, K/16] or flat."""
    quant = Quant("scales", None, 4, 16, 0, k, n)
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    b, scales, zp = nbits.quantize(w, quant, zero_points=zero_points is not None)
    if zero_points == "float":
        zp = nbits.zero_point_codes(zp, quant).astype(np.float32)
    if flat:
        scales, zp = scales.reshape(-1), None if zp is None else zp.reshape(-1)
    prefix = "graphfuse/ffn0-1"
    arrays = {f"{prefix}/down_weight": b, f"{prefix}/down_scales": scales}
    if zp is not None:
        arrays[f"{prefix}/down_zero_points"] = zp
    node = helper.make_node("MatMulNBits", ["h", *arrays], ["y"], name=f"{prefix}/down_matmul",
                            domain="com.microsoft", K=k, N=n, bits=4, block_size=16,
                            accuracy_level=0)  # fmt: skip
    graph = helper.make_graph(
        [node],
        "down",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


@pytest.mark.parametrize(
    ("zero_points", "flat"), [(None, False), ("uint8", True), ("uint8", False), ("float", False)]
)
def test_set_down_weight_requantizes_a_matmulnbits(zero_points: str | None, flat: bool) -> None:
    """A float fit written into a MatMulNBits down projection: requantised in the layout it had
    (shapes, ranks, dtypes), each weight within one step of its block's scale of the fit (round
    to nearest), and ONNX Runtime computes with exactly the weight that is returned."""
    model = _nbits_down(zero_points, flat)
    layout = [(t.name, list(t.dims), t.data_type) for t in model.graph.initializer]
    w = np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
    stored = set_down_weight(model, 0, 1, w)
    assert [(t.name, list(t.dims), t.data_type) for t in model.graph.initializer] == layout
    assert np.array_equal(down_weight(model, 0, 1), stored)
    down = DownProjection(model, 0, 1)
    scales = numpy_helper.to_array(down.tensors[1]).reshape(32, -1)
    step = np.abs(np.repeat(scales, 16, axis=1).T)  # [K, N]: each weight's block scale (±)
    assert np.all(np.abs(stored - w) <= step * (1 + 1e-6))
    assert 0 < np.linalg.norm(stored - w) / np.linalg.norm(w) < 0.1
    h = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"h": h})[0]
    assert np.max(np.abs(y - h @ stored)) <= 1e-5 * np.max(np.abs(y))
