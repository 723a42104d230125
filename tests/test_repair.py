"""The repair maths on cases with a known least-squares answer, then on a fused model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import graphfuse
from graphfuse.errors import GraphfuseError
from graphfuse.models.synthetic import build, reference
from graphfuse.repair import RidgeAccumulator, fit, repair_runs


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
