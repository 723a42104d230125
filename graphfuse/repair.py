"""Training-free repair of a fused run: refit its wide down-projection by ridge least squares.

Fusion makes every block of a run read the run's input X. The fused run's hidden activations H
(the input of its down projection, ``graphfuse/ffn<a>-<b>/down_matmul``) are fixed; only the
down-projection is refitted so the fused run reproduces what the *sequential* run produced from
the same X (brief, section 6; the idea of ReplaceMe, arXiv 2505.02819)::

    W2 = argmin ‖H W − (Y_seq − X − b2)‖² + λ·s·‖W − W2*‖²,   s = mean diag(HᵀH)
       = (HᵀH + λ s I)⁻¹ (HᵀT + λ s W2*)

The prior W2* (the plain join) keeps the fit from over-fitting; λ is chosen on held-out
validation activations. Memory stays bounded: HᵀH, HᵀT and TᵀT are accumulated in float64 batch
by batch, so activations are never all held; validation loss of any W is
tr(WᵀAW) − 2 tr(WᵀB) + c from the validation sums alone.

X and Y come from ONNX Runtime on the unfused model; H from ONNX Runtime on the part of the
*fused* model between the runs' inputs and their down projections, so H is what the fused graph
computes in every format graphfuse fuses (one wide float FFN; per-branch norms and MatMulNBits
gate/up around a joined MatMulNBits down). The down weight is read and written as float32
[K, N]: a float initializer, or a MatMulNBits weight dequantised, the fit requantised by ONNX
Runtime's blockwise quantiser (its error reported). All runs come from one pass over the data,
each window's first token (the attention sink) left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from tqdm import tqdm

from graphfuse import nbits
from graphfuse.blocks import Quant, nbits_layout
from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    import onnxruntime as ort

    from graphfuse.api import Inspection

# Each λ costs a Cholesky solve and a validation loss (O(w³) and O(n·w·d)) per run. On SmolLM2
# every choice so far fell in 0.03..3.
LAMBDAS = (3e-2, 1e-1, 3e-1, 1.0, 3.0)


class RidgeAccumulator:
    """Sums HᵀH, HᵀT, TᵀT over batches of (H [n, w], T [n, d]).

    HᵀH is symmetric: each batch adds only its upper triangle (BLAS syrk, half a GEMM's work),
    in ``dtype`` (float32 halves the largest array a fit holds; the solve is in float64), and
    `hth` gives the whole matrix. HᵀT and TᵀT are summed in float64."""

    def __init__(self, width: int, out: int, dtype: type = np.float64) -> None:
        self._upper: np.ndarray = np.zeros((width, width), dtype, order="F")  # syrk: in place
        self.hty = np.zeros((width, out))
        self.yty = 0.0
        self.rows = 0

    def add(self, h: np.ndarray, t: np.ndarray) -> None:
        from scipy.linalg.blas import dsyrk, ssyrk

        syrk = ssyrk if self._upper.dtype == np.float32 else dsyrk
        h = h.reshape(-1, h.shape[-1])
        t = t.reshape(-1, t.shape[-1]).astype(np.float64)
        # hᵀ is Fortran-ordered without a copy; upper += hᵀ (hᵀ)ᵀ
        self._upper = syrk(1.0, h.T.astype(self._upper.dtype, copy=False), beta=1.0,
                           c=self._upper, trans=0, lower=0, overwrite_c=True)  # fmt: skip
        self.hty += h.T.astype(np.float64) @ t
        self.yty += float(np.sum(t * t))
        self.rows += h.shape[0]

    @property
    def hth(self) -> np.ndarray:
        """HᵀH, whole, in float64: a new array each time, its lower half copied from the upper one
        (which is all syrk wrote) in strips, so no second w² array is made."""
        whole = self._upper.astype(np.float64)
        for i in range(0, len(whole), 512):
            whole[i : i + 512, :i] = whole[:i, i : i + 512].T
            block = whole[i : i + 512, i : i + 512]
            block[...] = np.triu(block) + np.triu(block, 1).T
        return whole

    def solve(self, prior: np.ndarray, lam: float, hth: np.ndarray | None = None) -> np.ndarray:
        """The ridge solution pulled towards ``prior`` with strength λ·s (``hth``: `hth`, when
        the caller holds it for several λ)."""
        from scipy.linalg import LinAlgError, cho_factor, cho_solve

        hth = self.hth if hth is None else hth
        s = float(np.mean(np.diag(hth)))
        a = hth.copy()  # hth stays as it is
        a[np.diag_indices_from(a)] += lam * s
        b = self.hty + lam * s * prior.astype(np.float64)
        try:  # HᵀH + λsI is symmetric positive definite for λ > 0: Cholesky, half LU's work
            return cho_solve(cho_factor(a, overwrite_a=True), b)
        except LinAlgError:  # not numerically positive definite: least squares instead
            return np.linalg.lstsq(hth + lam * s * np.eye(len(hth)), b, rcond=None)[0]

    def release(self) -> None:
        """Free HᵀH once fitted (the largest array of a fit: w² floats)."""
        self._upper = np.zeros((0, 0), self._upper.dtype)

    def loss(self, w: np.ndarray) -> float:
        """‖H W − T‖² / ‖T‖² over the accumulated rows."""
        w = w.astype(np.float64)
        sq = np.sum(w * (self.hth @ w)) - 2 * np.sum(w * self.hty) + self.yty
        return float(sq / self.yty)


class Rows:
    """Held-out (H, T) kept as rows, for ‖H W − T‖² / ‖T‖² directly: validation sets are short,
    so n·w floats are far fewer than the w² of HᵀH."""

    def __init__(self) -> None:
        self._h: list[np.ndarray] = []
        self._t: list[np.ndarray] = []
        self.rows = 0

    def add(self, h: np.ndarray, t: np.ndarray) -> None:
        self._h.append(h.reshape(-1, h.shape[-1]).astype(np.float32))
        self._t.append(t.reshape(-1, t.shape[-1]).astype(np.float32))
        self.rows += self._h[-1].shape[0]

    def loss(self, w: np.ndarray) -> float:
        if len(self._h) > 1:  # once: one GEMM per loss from then on
            self._h, self._t = [np.concatenate(self._h)], [np.concatenate(self._t)]
        h, t = self._h[0], self._t[0].astype(np.float64)
        r = (h @ w.astype(np.float32)).astype(np.float64) - t
        return float(np.sum(r * r) / np.sum(t * t))


@dataclass
class RunRepair:
    run: str
    lam: float
    validation_error_fused: float  # relative ‖HW−T‖²/‖T‖² with the plain W2*
    validation_error_repaired: float
    errors_by_lambda: dict[str, float]
    calibration_tokens: int
    # MatMulNBits only (None for a float weight): ‖dequant(requant(W)) − W‖_F / ‖W‖_F of the
    # fit W, and the validation error of the requantised weight, the one the model computes with
    requantization_error: float | None = None
    validation_error_requantized: float | None = None


def fit(
    calibration: RidgeAccumulator,
    validation: RidgeAccumulator | Rows,
    prior: np.ndarray,
    lambdas: Iterable[float] = LAMBDAS,
) -> tuple[np.ndarray, float, dict[float, float]]:
    """Fit for every λ; keep the one with the lowest validation error. ``calibration``'s HᵀH is
    released (its rows, HᵀT and TᵀT stay)."""
    errors: dict[float, float] = {}
    best: tuple[float, float, np.ndarray] | None = None
    hth = calibration.hth
    calibration.release()  # HᵀH is held in float64 now: the float32 sums are not needed
    for lam in lambdas:
        w = calibration.solve(prior, lam, hth)
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
    requantize: bool = False,
    linear: bool = False,
) -> tuple[onnx.ModelProto, list[RunRepair]]:
    """Fuse ``runs`` (block numbers of ``model``) and refit each fused down-projection.

    ``calibration`` and ``validation`` are lists of feed dicts (disjoint data) for the model the
    targets come from: ``model``, or ``reference`` when given. A decoder input a feed lacks is
    made for a prefill (all-ones mask, positions, empty cache), and inputs the model does not
    take are left out, so feeds of ``model`` also serve a ``reference`` with more cache inputs
    (e.g. ``graphfuse.genai.prefill_feeds(folder, model, ids)`` for an onnxruntime-genai model).
    Each run is fitted on its own inputs and outputs, so a fit does not depend on the other runs:
    ``cache`` (for one model and one set of data) keeps the float32 fits [K, N] between calls.

    ``reference``: take the inputs and outputs of the runs from this model instead, one with the
    same FFN blocks, e.g. ``model`` before its attention was removed. The fused run then learns
    to stand in for the removed attention too (healing). ``requantize``: fuse quantised gate/up
    weights requantised (`graphfuse.fuse`), so H is what that form computes. ``linear``: the
    down projections also read the normalised run input (H more columns, zero in the prior), so
    the fit learns a linear stand-in for the removed attention too; the fits are then
    [ΣI + H, H].
    """
    import graphfuse

    cache = {} if cache is None else cache
    found = graphfuse.inspect(model)
    source = found if reference is None else graphfuse.inspect(reference)
    if len(source.blocks) != len(found.blocks):
        raise GraphfuseError(
            f"the reference model has {len(source.blocks)} FFN blocks and the model "
            f"{len(found.blocks)}: pass the model this one was made from (before attention removal)"
        )
    fused, _ = graphfuse.fuse(model, runs, requantize=requantize, linear=runs if linear else ())
    todo = [run for run in runs if run not in cache]
    if todo:
        inputs = [found.blocks[a].residual_in for a, _ in todo]
        cache.update(_fit_runs(fused, todo, inputs, source, calibration, validation, lambdas,
                               threads, progress))  # fmt: skip
    for a, b in runs:
        set_down_weight(fused, a, b, cache[(a, b)][0])
    return fused, [cache[run][1] for run in runs]


def down_weight(model: onnx.ModelProto, a: int, b: int) -> np.ndarray:
    """The down projection of fused run ``a``-``b`` of ``model`` as float32 [K, N] (dequantised
    for a MatMulNBits): the plain join, before a repair."""
    return DownProjection(model, a, b).weight()


def set_down_weight(model: onnx.ModelProto, a: int, b: int, weight: np.ndarray) -> np.ndarray:
    """Write ``weight`` (float [K, N]) as the down projection of fused run ``a``-``b`` of
    ``model``, in place, in the format the projection has (cast to a float initializer's dtype,
    or requantised for a MatMulNBits). Returns the weight the model now computes with (float32)."""
    return DownProjection(model, a, b).write(np.asarray(weight, np.float32))


def _fit_runs(
    fused: onnx.ModelProto,
    runs: list[tuple[int, int]],
    inputs: list[str],
    source: Inspection,
    calibration: list[dict[str, np.ndarray]],
    validation: list[dict[str, np.ndarray]],
    lambdas: Iterable[float],
    threads: int | None,
    progress: bool,
) -> dict[tuple[int, int], tuple[np.ndarray, RunRepair]]:
    """One pass of ONNX Runtime over each data set: ``source`` cut down to the runs' inputs X and
    sequential outputs Y gives the targets; ``fused`` cut down to the part between X (named
    ``inputs`` there) and each run's down projection gives H."""
    from graphfuse import ir as irs
    from graphfuse.method import session

    ends = [(source.blocks[a].residual_in, source.blocks[b].residual_out) for a, b in runs]
    taps = list(dict.fromkeys(v for pair in ends for v in pair))
    # the split graph: every residual stream has a name there (a skip norm's may not)
    sequential = session(irs.runnable(irs.with_outputs(source.model, taps, only=True)), threads)
    # ONNX Runtime spells a type "tensor(float16)": the TensorProto name, in lower case
    types = {o.name: onnx.TensorProto.DataType.Value(o.type[7:-1].upper())
             for o in sequential.get_outputs()}  # fmt: skip
    downs = [DownProjection(fused, a, b) for a, b in runs]
    cut = _cut(fused, {v: types[x] for v, (x, _) in zip(inputs, ends, strict=True)},
               [d.hidden for d in downs])  # fmt: skip
    hidden = session(cut, threads)
    del cut
    priors = [d.weight() for d in downs]
    stats = []
    for part, feeds in (("calibration", calibration), ("validation", validation)):
        accs: list[RidgeAccumulator | Rows] = [
            RidgeAccumulator(p.shape[0], p.shape[1], np.float32)
            if part == "calibration"
            else Rows()
            for p in priors
        ]
        for feed in tqdm(feeds, desc=f"repair: {part}", disable=not progress):
            values = dict(zip(taps, sequential.run(taps, _prefill(sequential, feed)), strict=True))
            hs = hidden.run(None, {v: values[x] for v, (x, _) in zip(inputs, ends, strict=True)})
            for acc, h, down, (x, y) in zip(accs, hs, downs, ends, strict=True):
                t = values[y].astype(np.float64) - values[x] - down.bias
                acc.add(*_drop_first_position(h, t))
        stats.append(accs)
    del sequential, hidden  # the fits need the sums only: free the sessions before the w² arrays
    fits = {}
    for (a, b), down, prior, cal, val in zip(runs, downs, priors, *stats, strict=True):
        assert isinstance(cal, RidgeAccumulator)
        w, lam, errors = fit(cal, val, prior, lambdas)
        w = w.astype(np.float32)
        repair = RunRepair(
            run=f"{a}-{b}",
            lam=lam,
            validation_error_fused=val.loss(prior),
            validation_error_repaired=errors[lam],
            errors_by_lambda={f"{k:g}": v for k, v in errors.items()},
            calibration_tokens=cal.rows,
        )
        if down.quant is not None:
            stored = down.stored(w)
            repair.requantization_error = float(np.linalg.norm(stored - w) / np.linalg.norm(w))
            repair.validation_error_requantized = val.loss(stored)
        fits[(a, b)] = (w, repair)
    return fits


def _drop_first_position(h: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Leave each window's first token out of the fit.

    The first token of a sequence is the attention sink: early FFN blocks write massive
    activations into its residual stream. In SmolLM2's run 10..12 that one token's output
    dwarfs every other token's, so a plain fit spends its capacity on it and perplexity gets
    worse though the activation error falls; without it, perplexity improves (see the README,
    "run 10..12")."""
    if h.ndim < 3 or h.shape[-2] < 2:
        return h, t
    return h[..., 1:, :], t[..., 1:, :]


def _prefill(session: ort.InferenceSession, feed: Mapping[str, np.ndarray]) -> dict:
    """What ``session`` takes of ``feed``, with the decoder inputs ``feed`` lacks made for a
    prefill of its ``input_ids`` (e.g. the cache of layers a reference still has)."""
    from graphfuse.evaluate import prefill_feeds

    names = [arg.name for arg in session.get_inputs()]
    given = {name: feed[name] for name in names if name in feed}
    if len(given) == len(names) or "input_ids" not in given:
        return given  # complete, or not a language model: ONNX Runtime names what is missing
    return {**prefill_feeds(session, given["input_ids"], given), **given}


def _cut(model: onnx.ModelProto, inputs: dict[str, int], outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from ``inputs`` (name → element type) and
    constants, with the initializers it reads (onnx_ir's ``extract``).

    Skip norms are split first (Add + norm, `graphfuse.skip_norm`): one whose sum output is an
    input X computes its norm from X's parts, and the cut must stop at X."""
    import onnx_ir as ir

    from graphfuse import ir as irs
    from graphfuse import skip_norm

    m = irs.from_proto(model)
    skip_norm.split(m)
    named = irs.values(m.graph)
    for name in inputs:
        if name not in named or named[name].is_initializer():
            raise GraphfuseError(f"repair: run input '{name}' is not a value of the fused model")
    try:
        graph = ir.convenience.extract(m.graph, list(inputs), outputs)
    except ValueError as e:
        raise GraphfuseError(
            f"repair: the fused runs' hidden activations depend on more than the runs' inputs "
            f"{sorted(inputs)} ({e})"
        ) from None
    for value in graph.inputs:
        value.dtype = ir.DataType(inputs[value.name])  # type: ignore[index]
    cut = ir.Model(graph, ir_version=m.ir_version)  # the graph carries the opset imports
    return irs.to_proto(cut)


class DownProjection:
    """The joined down projection of fused run a-b (``graphfuse/ffn<a>-<b>/down_matmul``), its
    weight read and written as float32 [K, N]: a MatMul's float initializer, or a MatMulNBits
    weight (B, scales, zero points) dequantised and, on writing, requantised in the same layout
    by ONNX Runtime's blockwise quantiser (round to nearest)."""

    def __init__(self, model: onnx.ModelProto, a: int, b: int) -> None:
        prefix = f"graphfuse/ffn{a}-{b}"
        node = next((n for n in model.graph.node if n.name == f"{prefix}/down_matmul"), None)
        if node is None:
            raise GraphfuseError(
                f"the model has no fused run {a}-{b} (no node {prefix}/down_matmul)"
            )
        tensors = {t.name: t for t in model.graph.initializer}
        self.hidden = node.input[0]  # H, the wide hidden activations
        self.tensors = [tensors[v] for v in node.input[1:4] if v]  # W | B, scales[, zero points]
        bias = tensors.get(f"{prefix}/down_bias")
        self.bias = 0.0 if bias is None else onnx.numpy_helper.to_array(bias).astype(np.float64)
        self.quant = _quant(node) if node.op_type == "MatMulNBits" else None

    def weight(self) -> np.ndarray:
        """The weight the model computes with now."""
        return self._decode([onnx.numpy_helper.to_array(t) for t in self.tensors])

    def stored(self, w: np.ndarray) -> np.ndarray:
        """The weight the model would compute with once ``w`` is written."""
        return self._decode(self._encode(w))

    def write(self, w: np.ndarray) -> np.ndarray:
        """Store ``w`` in the model's initializers; return :meth:`stored`."""
        arrays = self._encode(w)
        for tensor, array in zip(self.tensors, arrays, strict=True):
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(array), tensor.name))
        return self._decode(arrays)

    def _encode(self, w: np.ndarray) -> list[np.ndarray]:
        """``w`` as stored: cast to the weight's dtype, or quantised, each array in the dtype and
        shape of the initializer it replaces."""
        dtypes = [onnx.helper.tensor_dtype_to_np_dtype(t.data_type) for t in self.tensors]
        if self.quant is None:
            return [w.astype(dtypes[0])]
        has_zero_points = len(self.tensors) == 3
        b, scales, zero_points = nbits.quantize(
            w, self.quant, zero_points=has_zero_points, scales_dtype=dtypes[1]
        )
        arrays = [b, scales]
        if zero_points is not None:
            if dtypes[2] != np.uint8:  # zero points stored unpacked, in the scales' type
                zero_points = nbits.zero_point_codes(zero_points, self.quant).astype(dtypes[2])
            arrays.append(zero_points)
        return [a.reshape(t.dims) for a, t in zip(arrays, self.tensors, strict=True)]

    def _decode(self, arrays: list[np.ndarray]) -> np.ndarray:
        if self.quant is None:
            return arrays[0].astype(np.float32)
        b, scales, *zero_points = arrays
        w = nbits.dequantize(b, scales, zero_points[0] if zero_points else None, self.quant)
        return w.T.astype(np.float32)  # dequantize gives [N, K]


def _quant(node: onnx.NodeProto) -> Quant:
    """How a MatMulNBits node stores its weight, from its attributes."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    zero_points = node.input[3] if len(node.input) > 3 and node.input[3] else None
    return nbits_layout(attrs, node.input[2], zero_points)
