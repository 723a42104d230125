"""Training-free repair of a fused run: refit its wide down-projection by ridge least squares.

Fusion makes every block of a run read the run's input X. The fused run's hidden activations
H = act(n̂(X) W1*) ⊙ (n̂(X) W3*) are fixed; only the down-projection is refitted so the fused run
reproduces what the *sequential* run produced from the same X (brief, section 6; the idea of
ReplaceMe, arXiv 2505.02819)::

    W2 = argmin ‖H W − (Y_seq − X − b2)‖² + λ·s·‖W − W2*‖²,   s = mean diag(HᵀH)
       = (HᵀH + λ s I)⁻¹ (HᵀT + λ s W2*)

The prior W2* (the plain concatenation) keeps the fit from over-fitting; λ is chosen on
held-out validation activations. Memory stays bounded: HᵀH, HᵀT and TᵀT are accumulated in
float64 batch by batch, so activations are never all held; validation loss of any W is
tr(WᵀAW) − 2 tr(WᵀB) + c from the validation sums alone.

Runs are repaired in graph order, each on the model whose earlier runs are already fused and
repaired, so a run's fit sees the drift its predecessors leave.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
from tqdm import tqdm

from graphfuse.errors import GraphfuseError

LAMBDAS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0)


class RidgeAccumulator:
    """Sums HᵀH, HᵀT, TᵀT in float64 over batches of (H [n, w], T [n, d])."""

    def __init__(self, width: int, out: int) -> None:
        self.hth = np.zeros((width, width))
        self.hty = np.zeros((width, out))
        self.yty = 0.0
        self.rows = 0

    def add(self, h: np.ndarray, t: np.ndarray) -> None:
        h = h.reshape(-1, h.shape[-1]).astype(np.float64)
        t = t.reshape(-1, t.shape[-1]).astype(np.float64)
        self.hth += h.T @ h
        self.hty += h.T @ t
        self.yty += float(np.sum(t * t))
        self.rows += h.shape[0]

    def solve(self, prior: np.ndarray, lam: float) -> np.ndarray:
        """The ridge solution pulled towards ``prior`` with strength λ·s."""
        s = float(np.mean(np.diag(self.hth)))
        a = self.hth + lam * s * np.eye(self.hth.shape[0])
        b = self.hty + lam * s * prior.astype(np.float64)
        try:
            return np.linalg.solve(a, b)
        except np.linalg.LinAlgError:  # singular even with the ridge: least squares instead
            return np.linalg.lstsq(a, b, rcond=None)[0]

    def loss(self, w: np.ndarray) -> float:
        """‖H W − T‖² / ‖T‖² over the accumulated rows."""
        w = w.astype(np.float64)
        sq = np.sum(w * (self.hth @ w)) - 2 * np.sum(w * self.hty) + self.yty
        return float(sq / self.yty)


@dataclass
class RunRepair:
    run: str
    lam: float
    validation_error_fused: float  # relative ‖HW−T‖²/‖T‖² with the plain W2*
    validation_error_repaired: float
    errors_by_lambda: dict[str, float]
    calibration_tokens: int


def fit(
    calibration: RidgeAccumulator,
    validation: RidgeAccumulator,
    prior: np.ndarray,
    lambdas: Iterable[float] = LAMBDAS,
) -> tuple[np.ndarray, float, dict[float, float]]:
    """Fit for every λ; keep the one with the lowest validation error."""
    errors: dict[float, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    for lam in lambdas:
        w = calibration.solve(prior, lam)
        errors[lam] = validation.loss(w)
        if best is None or errors[lam] < best[0]:
            best = (errors[lam], lam, w)
    assert best is not None
    return best[2], best[1], errors


def repair_runs(
    model: onnx.ModelProto,
    runs: list[tuple[int, int]],
    calibration: list[dict[str, np.ndarray]],
    validation: list[dict[str, np.ndarray]],
    *,
    lambdas: Iterable[float] = LAMBDAS,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[onnx.ModelProto, list[RunRepair]]:
    """Fuse ``runs`` (block numbers of ``model``) one by one, refitting each down-projection.

    ``calibration`` and ``validation`` are lists of feed dicts for ``model`` (disjoint data).
    Returns the fused, repaired model and what each fit did.
    """
    import graphfuse
    from graphfuse.surgery import with_outputs

    current = model
    shift = 0  # fusing a run of k blocks renumbers the blocks after it by k - 1
    results: list[RunRepair] = []
    for first, last in sorted(runs):
        a, b = first - shift, last - shift
        found = graphfuse.inspect(current)
        x_name, y_name = found.blocks[a].residual_in, found.blocks[b].residual_out
        fused, _ = graphfuse.fuse(current, [(a, b)])
        prefix = f"graphfuse/ffn{a}-{b}"
        weights = {t.name: t for t in fused.graph.initializer if t.name.startswith(prefix)}
        down = onnx.numpy_helper.to_array(weights[f"{prefix}/down_weight"])
        bias_t = weights.get(f"{prefix}/down_bias")
        bias = 0.0 if bias_t is None else onnx.numpy_helper.to_array(bias_t).astype(np.float64)
        sequential = _session(with_outputs(current, [x_name, y_name]), threads)
        wide = _session(with_outputs(fused, [f"{prefix}/product"]), threads)
        stats = []
        for part, feeds in (("calibration", calibration), ("validation", validation)):
            acc = RidgeAccumulator(down.shape[0], down.shape[1])
            for feed in tqdm(feeds, desc=f"repair {first}-{last}: {part}", disable=not progress):
                x, y = sequential.run([x_name, y_name], feed)
                (h,) = wide.run([f"{prefix}/product"], feed)
                acc.add(h, y.astype(np.float64) - x - bias)
            stats.append(acc)
        w, lam, errors = fit(stats[0], stats[1], down, lambdas)
        _replace(fused, f"{prefix}/down_weight", w.astype(down.dtype))
        results.append(
            RunRepair(
                run=f"{first}-{last}",
                lam=lam,
                validation_error_fused=stats[1].loss(down),
                validation_error_repaired=errors[lam],
                errors_by_lambda={f"{k:g}": v for k, v in errors.items()},
                calibration_tokens=stats[0].rows,
            )
        )
        current = fused
        shift += last - first
    return current, results


def _session(model: onnx.ModelProto, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CPUExecutionProvider":
        raise GraphfuseError("onnxruntime did not start the CPU provider")
    return session


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
            return
    raise KeyError(name)
