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

Each run is fitted on the inputs and outputs it has in the unfused model, all runs from one
pass over the data, each window's first token (the attention sink) left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from tqdm import tqdm

from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    from graphfuse.blocks import FfnBlock

# Each λ costs a Cholesky solve and a validation loss (O(w³) and O(w²d)) per run. On SmolLM2
# every choice so far fell in 0.01..3.
LAMBDAS = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)


class RidgeAccumulator:
    """Sums HᵀH, HᵀT, TᵀT in float64 over batches of (H [n, w], T [n, d]).

    HᵀH is symmetric: each batch adds only its upper triangle (BLAS syrk, half a GEMM's work),
    and `hth` gives the whole matrix."""

    def __init__(self, width: int, out: int) -> None:
        self._upper = np.zeros((width, width), order="F")  # syrk updates it in place
        self._whole: np.ndarray | None = None
        self.hty = np.zeros((width, out))
        self.yty = 0.0
        self.rows = 0

    def add(self, h: np.ndarray, t: np.ndarray) -> None:
        from scipy.linalg.blas import dsyrk

        h = h.reshape(-1, h.shape[-1]).astype(np.float64)
        t = t.reshape(-1, t.shape[-1]).astype(np.float64)
        # hᵀ is Fortran-ordered without a copy; upper += hᵀ (hᵀ)ᵀ
        self._upper = dsyrk(1.0, h.T, beta=1.0, c=self._upper, trans=0, lower=0,
                            overwrite_c=True)  # fmt: skip
        self._whole = None
        self.hty += h.T @ t
        self.yty += float(np.sum(t * t))
        self.rows += h.shape[0]

    @property
    def hth(self) -> np.ndarray:
        """HᵀH, whole (not to be modified)."""
        if self._whole is None:
            upper = np.triu(self._upper)
            self._whole = upper + np.triu(upper, 1).T
        return self._whole

    def solve(self, prior: np.ndarray, lam: float) -> np.ndarray:
        """The ridge solution pulled towards ``prior`` with strength λ·s."""
        from scipy.linalg import LinAlgError, cho_factor, cho_solve

        hth = self.hth
        s = float(np.mean(np.diag(hth)))
        a = hth + lam * s * np.eye(hth.shape[0])  # a new array: hth stays as it is
        b = self.hty + lam * s * prior.astype(np.float64)
        try:  # HᵀH + λsI is symmetric positive definite for λ > 0: Cholesky, half LU's work
            return cho_solve(cho_factor(a, overwrite_a=True), b)
        except LinAlgError:  # not numerically positive definite: least squares instead
            return np.linalg.lstsq(hth + lam * s * np.eye(len(hth)), b, rcond=None)[0]

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
    cache: dict[tuple[int, int], tuple[np.ndarray, RunRepair]] | None = None,
    reference: onnx.ModelProto | None = None,
) -> tuple[onnx.ModelProto, list[RunRepair]]:
    """Fuse ``runs`` (block numbers of ``model``) and refit each fused down-projection.

    ``calibration`` and ``validation`` are lists of feed dicts for ``model`` (disjoint data).
    Each run is fitted on its own inputs and outputs in ``model``, so a fit does not depend on
    the other runs: ``cache`` (for one model and one set of data) keeps fits between calls.

    ``reference``: take the inputs and outputs of the runs from this model instead, one with the
    same FFN blocks, e.g. ``model`` before its attention was removed. The fused run then learns
    to stand in for the removed attention too (healing).
    """
    import graphfuse

    cache = {} if cache is None else cache
    blocks = graphfuse.inspect(model).blocks
    source, source_blocks = model, blocks
    if reference is not None:
        source, source_blocks = reference, graphfuse.inspect(reference).blocks
        if len(source_blocks) != len(blocks):
            raise GraphfuseError(
                f"the reference model has {len(source_blocks)} FFN blocks and the model "
                f"{len(blocks)}: pass the model this one was made from (before attention removal)"
            )
    fused, _ = graphfuse.fuse(model, runs)
    todo = [run for run in runs if run not in cache]
    if todo:
        weights = {t.name: t for t in fused.graph.initializer if t.name.startswith("graphfuse/")}
        wide = {(a, b): _WideFfn(weights, f"graphfuse/ffn{a}-{b}", blocks[a]) for a, b in todo}
        cache.update(_fit_runs(source, source_blocks, wide, calibration, validation, lambdas,
                               threads, progress))  # fmt: skip
    for a, b in runs:
        _replace(fused, f"graphfuse/ffn{a}-{b}/down_weight", cache[(a, b)][0])
    return fused, [cache[run][1] for run in runs]


def _fit_runs(
    model: onnx.ModelProto,
    blocks: Sequence[FfnBlock],
    wide: dict[tuple[int, int], _WideFfn],
    calibration: list[dict[str, np.ndarray]],
    validation: list[dict[str, np.ndarray]],
    lambdas: Iterable[float],
    threads: int | None,
    progress: bool,
) -> dict[tuple[int, int], tuple[np.ndarray, RunRepair]]:
    """One pass of ONNX Runtime over each data set, on ``model`` (whose FFN blocks are
    ``blocks``) cut down to the runs' inputs X and sequential outputs Y, gives the targets; the
    fused hidden activations H are computed from X with the fused weights (what the fused graph
    computes, in float64)."""
    from graphfuse.method import session
    from graphfuse.surgery import only_outputs

    runs = list(wide)
    ends = [(blocks[a].residual_in, blocks[b].residual_out) for a, b in runs]
    taps = list(dict.fromkeys(v for pair in ends for v in pair))
    sequential = session(only_outputs(model, taps), threads)
    stats = []
    for part, feeds in (("calibration", calibration), ("validation", validation)):
        accs = [RidgeAccumulator(*wide[run].down.shape) for run in runs]
        for feed in tqdm(feeds, desc=f"repair: {part}", disable=not progress):
            values = dict(zip(taps, sequential.run(taps, feed), strict=True))
            for acc, run, (x_name, y_name) in zip(accs, runs, ends, strict=True):
                w = wide[run]
                x, y = _drop_first_position(values[x_name].astype(np.float64), values[y_name])
                acc.add(w.hidden(x), y - x - w.down_bias)
        stats.append(accs)
    fits = {}
    for (a, b), cal, val in zip(runs, *stats, strict=True):
        w = wide[(a, b)]
        fit_w, lam, errors = fit(cal, val, w.down, lambdas)
        fits[(a, b)] = (
            fit_w.astype(w.down.dtype),
            RunRepair(
                run=f"{a}-{b}",
                lam=lam,
                validation_error_fused=val.loss(w.down),
                validation_error_repaired=errors[lam],
                errors_by_lambda={f"{k:g}": v for k, v in errors.items()},
                calibration_tokens=cal.rows,
            ),
        )
    return fits


def _drop_first_position(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave each window's first token out of the fit.

    The first token of a sequence is the attention sink: early FFN blocks write massive
    activations into its residual stream. In SmolLM2's run 10..12 that one token's output
    dwarfs every other token's, so a plain fit spends its capacity on it and perplexity gets
    worse though the activation error falls; without it, perplexity improves (see the README,
    "run 10..12")."""
    if x.ndim < 3 or x.shape[-2] < 2:
        return x, y
    return x[..., 1:, :], y[..., 1:, :]


class _WideFfn:
    """A fused run's wide FFN up to its down-projection, in float64 NumPy: H from X."""

    def __init__(self, weights: dict[str, onnx.TensorProto], prefix: str, first) -> None:
        def get(role: str) -> np.ndarray | None:
            tensor = weights.get(f"{prefix}/{role}")
            return None if tensor is None else onnx.numpy_helper.to_array(tensor)

        if first.activation not in ACTIVATIONS:
            raise GraphfuseError(f"repair: activation '{first.activation}' is not SiLU or GELU")
        self.prefix, self.eps, self.activation = prefix, first.norm.eps, first.activation
        self.gate = get("gate_weight").astype(np.float64)  # type: ignore[union-attr]
        self.up = get("up_weight").astype(np.float64)  # type: ignore[union-attr]
        down = get("down_weight")
        assert down is not None, prefix
        self.down: np.ndarray = down
        self.gate_bias, self.up_bias = get("gate_bias"), get("up_bias")
        down_bias = get("down_bias")
        self.down_bias = 0.0 if down_bias is None else down_bias.astype(np.float64)

    def hidden(self, x: np.ndarray) -> np.ndarray:
        z = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps)
        gate, up = z @ self.gate, z @ self.up
        if self.gate_bias is not None:
            gate = gate + self.gate_bias
        if self.up_bias is not None:
            up = up + self.up_bias
        return ACTIVATIONS[self.activation](gate) * up


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / np.sqrt(2)))


ACTIVATIONS = {
    "silu": lambda x: x / (1 + np.exp(-x)),
    "gelu": _gelu,
    "gelu_tanh": lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
}


def _replace(model: onnx.ModelProto, name: str, array: np.ndarray) -> None:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(array), name))
            return
    raise KeyError(name)
