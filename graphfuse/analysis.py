"""Dependency analysis of FFN blocks (the paper's §3): how much does block j depend on block i?

    h_j(X)      = block j's contribution: its residual output minus its residual input
    h̃_j⁽ⁱ⁾(X)   = the same, with block i (i < j) removed from the model
    M[i, j]     = mean over tokens of cosine_distance(h_j, h̃_j⁽ⁱ⁾)      (NaN where i ≥ j)

Low M[i, j] means block j computes nearly the same thing whether or not block i ran before it,
so the two can run in parallel (FFN Fusion) at little cost. Per block, two diagnostics of the
baseline run are kept as well: cos-distance(f(X), X) (how much the block turns the stream) and
‖h(X)‖ / ‖X‖ (how much it adds to it).

Everything runs in ONNX Runtime on the ONNX model itself, so the numbers describe the graph that
is fused and shipped. One session computes the baseline with every block's residual input and
output exposed as graph outputs; one more session per removed block i gives h̃_j⁽ⁱ⁾ for all
j > i at once. Those sessions are cut to what they need: the original outputs (logits, KV
cache) and the layers after the last analysed block are dropped, and the session for block i
starts at block i's residual input, fed from the baseline run, instead of recomputing the
prefix, which is the same with or without block i. One session is alive at a time: the
baseline runs over every batch first, keeping the analysed residual streams (batches × blocks ×
tokens × H), then each removed-block session is built, run over the batches and freed.

    dep = dependency_matrix("model.onnx", [{"input_ids": ids} for ids in batches])
    plot_dependency(dep, "dependency.png")
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_ir as ir
from onnx import external_data_helper
from tqdm import tqdm

from graphfuse import ir as irs
from graphfuse import onnx_io, skip_norm
from graphfuse.blocks import FfnBlock
from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    from graphfuse.api import Inspection

ModelLike = onnx.ModelProto | str | os.PathLike
RULE = "graphfuse.analysis"


@dataclass
class Dependency:
    """The dependency matrix and per-block diagnostics over ``tokens`` calibration tokens.

    Rows, columns and diagnostics follow ``blocks`` (FFN block numbers as `graphfuse.inspect`
    prints them): ``matrix[a, b]`` is M[blocks[a], blocks[b]]. Use `at` to index by block.
    """

    blocks: list[int]
    matrix: np.ndarray  # [n, n] float64, NaN on and below the diagonal
    io_cosine_distance: np.ndarray  # [n] mean cos-distance(f(X), X)
    relative_norm: np.ndarray  # [n] mean ‖h(X)‖ / ‖X‖
    tokens: int

    def at(self, i: int, j: int) -> float:
        """M[i, j] by block number; NaN where it was not measured."""
        where = {b: k for k, b in enumerate(self.blocks)}
        if i not in where or j not in where:
            return float("nan")
        return float(self.matrix[where[i], where[j]])

    def to_json(self) -> str:
        def floats(a: np.ndarray) -> list:
            return [None if np.isnan(v) else float(v) for v in a]

        return json.dumps(
            {
                "blocks": self.blocks,
                "tokens": self.tokens,
                "matrix": [floats(row) for row in self.matrix],
                "io_cosine_distance": floats(self.io_cosine_distance),
                "relative_norm": floats(self.relative_norm),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> Dependency:
        data = json.loads(text)

        def array(values: list) -> np.ndarray:
            return np.array(values, dtype=float)  # None becomes NaN

        return cls(
            blocks=[int(b) for b in data["blocks"]],
            matrix=array(data["matrix"]).reshape(len(data["blocks"]), len(data["blocks"])),
            io_cosine_distance=array(data["io_cosine_distance"]),
            relative_norm=array(data["relative_norm"]),
            tokens=int(data["tokens"]),
        )


# -- model edits -----------------------------------------------------------------------------------


def expose(model: onnx.ModelProto, values: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``values`` (interior values or graph inputs)."""
    return irs.to_proto(irs.with_outputs(irs.from_proto(model), values))


def bypass_ffn(
    model: ModelLike, block: int, *, base_dir: Path | str | None = None
) -> onnx.ModelProto:
    """``model`` without FFN block ``block``: readers of its residual output read its residual
    input instead (through an Identity where the output is a graph output, to keep its name),
    and the FFN branch, left dead, is removed."""
    found = _inspected(model, base_dir)
    if not 0 <= block < len(found.blocks):
        raise GraphfuseError(
            f"no FFN block {block}: the model has blocks 0-{len(found.blocks) - 1}"
        )
    _bypass(found.model, found.blocks[block])
    irs.remove_dead(found.model)
    skip_norm.join(found.model, found.split)
    return irs.to_proto(found.model)


def _bypass(model: ir.Model, block: FfnBlock) -> None:
    """Short-circuit ``block`` in ``model`` (the one it was found in, or a clone of it)."""
    named = irs.values(model.graph)
    x, y = named[block.residual_in], named[block.residual_out]
    add = y.producer()
    assert add is not None
    if y.is_graph_output():
        identity = ir.node("Identity", [x], name=add.name or y.name,
                           doc_string=f"{RULE}: FFN block {block.index} bypassed")  # fmt: skip
        ir.convenience.replace_nodes_and_values(
            model.graph, add, [add], [identity], [y], [identity.outputs[0]]
        )
    else:
        ir.convenience.replace_all_uses_with(y, x)


def _analysis_model(
    found: Inspection, outputs: list[str], *, bypass: FfnBlock | None = None
) -> tuple[onnx.ModelProto, str | None]:
    """A model whose only outputs are ``outputs`` (optionally with block ``bypass`` removed).

    With ``bypass``, the model starts at the block's residual input, which becomes a graph
    input (returned as the second value, None if it cannot be cut there): the prefix is the same
    as in the baseline, so the caller feeds the baseline's value instead of recomputing it.
    The edit runs on a clone (tensors shared); the weights still read are loaded at the end.
    """
    model = irs.with_outputs(found.model, outputs, only=True)
    graph = model.graph
    cut = None
    if bypass is not None:
        x = irs.values(graph)[bypass.residual_in]
        node = x.producer()
        # A node with other outputs (an ORT-fused SkipLayerNorm, say) cannot simply go.
        if node is not None and len([v for v in node.outputs if v.name]) == 1:
            cut = bypass.residual_in
            fed = ir.Value(name=None, type=x.type, shape=x.shape)
            ir.convenience.replace_all_uses_with(x, fed, replace_graph_outputs=True)
            x.name, fed.name = None, cut
            graph.inputs.append(fed)
        _bypass(model, bypass)
    irs.remove_dead(model)
    # Old exports list weights among the graph inputs too; one no longer read would become an
    # input without a value that the caller would have to feed.
    stale = [v for v in graph.inputs if v.is_initializer() and not v.uses()]
    for v in stale:
        graph.inputs.remove(v)
        graph.initializers.pop(v.name)  # type: ignore[arg-type]
    return irs.runnable(model), cut


def _inspected(model: ModelLike, base_dir: Path | str | None) -> Inspection:
    from graphfuse.api import inspect

    if not isinstance(model, onnx.ModelProto):
        base_dir = base_dir or onnx_io.model_base_dir(model)
        model = onnx_io.load(model)
    external = [
        t.name for t in model.graph.initializer if external_data_helper.uses_external_data(t)
    ]
    if base_dir is None and external:
        raise GraphfuseError(
            f"weight '{external[0]}' is stored as external data: pass the model's path, or "
            "base_dir= the folder its data file is in"
        )
    return inspect(model, Path(base_dir) if base_dir is not None else None)


# -- the measurement -------------------------------------------------------------------------------


def dependency_matrix(
    model: ModelLike,
    feeds_batches: Iterable[Mapping[str, np.ndarray]],
    blocks: list[int] | None = None,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    progress: bool = True,
    *,
    base_dir: Path | str | None = None,
) -> Dependency:
    """Measure M[i, j] for the FFN blocks ``blocks`` (default: all) over ``feeds_batches``.

    ``model``: a proto or a path (``base_dir``: where a proto's external data lives).
    ``feeds_batches``: feed dicts for the model, one per batch, read once (a generator will do);
    inputs a cut session no longer has are left out. Every position of every batch is a token.
    """
    from graphfuse.evaluate import make_session

    inspected = _inspected(model, base_dir)
    found = inspected.blocks
    chosen = sorted(set(range(len(found)) if blocks is None else blocks))
    bad = [b for b in chosen if not 0 <= b < len(found)]
    if bad or not chosen:
        raise GraphfuseError(
            f"blocks: {bad or 'none given'}: the model has FFN blocks 0-{len(found) - 1}"
        )
    analysed = [found[b] for b in chosen]
    n = len(analysed)

    def fetched(a: int) -> list[str]:  # the residual streams of analysed[a:]
        return [v for b in analysed[a:] for v in (b.residual_in, b.residual_out)]

    # The baseline session over every batch first, keeping each batch's feeds and the streams
    # the removed-block sessions read; then one session per removed block analysed[a],
    # a = 0 .. n-2, each with the value it is cut at (fed from the baseline) and the values it
    # returns, built, run over the batches and freed in turn: one session at a time.
    proto, _ = _analysis_model(inspected, fetched(0))
    baseline = make_session(proto, provider, threads)
    del proto
    pair_sum = np.zeros((n, n))
    io_sum = np.zeros(n)
    norm_sum = np.zeros(n)
    tokens = 0
    kept = []  # (feeds, baseline values, unit contributions) per batch
    total = len(feeds_batches) if isinstance(feeds_batches, list | tuple) else None
    for feeds in tqdm(feeds_batches, total=total, desc="dependency: baseline", unit="batch",
                      disable=not progress, leave=False):  # fmt: skip
        base = _run(baseline, feeds, fetched(0))
        units = []  # block j's unit contribution direction, [tokens, H] float64
        for k, b in enumerate(analysed):
            x, y = _tokens(base[b.residual_in]), _tokens(base[b.residual_out])
            h = y - x
            io_sum[k] += _cosine_distance(_unit(y), _unit(x)).sum()
            norm_sum[k] += (np.linalg.norm(h, axis=-1) / _safe(np.linalg.norm(x, axis=-1))).sum()
            units.append(_unit(h))
        tokens += len(units[0])
        # what the removed-block sessions are fed: each block's residual input
        kept.append((feeds, {b.residual_in: base[b.residual_in] for b in analysed}, units))
        del base
    del baseline
    if tokens == 0:
        raise GraphfuseError("feeds_batches is empty: pass at least one batch of feeds")
    for a in tqdm(range(n - 1), desc="dependency", unit="block", disable=not progress):
        proto, cut = _analysis_model(inspected, fetched(a + 1), bypass=analysed[a])
        session = make_session(proto, provider, threads)
        del proto
        for feeds, base, units in kept:
            extra = {cut: base[cut]} if cut is not None else {}
            out = _run(session, {**feeds, **extra}, fetched(a + 1))
            for k, b in enumerate(analysed[a + 1 :], start=a + 1):
                h_removed = _tokens(out[b.residual_out]) - _tokens(out[b.residual_in])
                pair_sum[a, k] += _cosine_distance(units[k], _unit(h_removed)).sum()
        del session
    del kept

    matrix = np.full((n, n), np.nan)
    upper = np.triu_indices(n, k=1)
    matrix[upper] = pair_sum[upper] / tokens
    return Dependency(chosen, matrix, io_sum / tokens, norm_sum / tokens, tokens)


def _run(session, feeds: Mapping[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    wanted = {i.name for i in session.get_inputs()}
    names = list(dict.fromkeys(names))
    values = session.run(names, {k: v for k, v in feeds.items() if k in wanted})
    return dict(zip(names, values, strict=True))


def _tokens(value: np.ndarray) -> np.ndarray:
    """[..., H] → [tokens, H] in float64, so that tiny distances are not lost to rounding."""
    return np.asarray(value, np.float64).reshape(-1, value.shape[-1])


def _safe(norm: np.ndarray) -> np.ndarray:
    return np.where(norm > 0, norm, np.inf)  # a zero vector has no direction: treated as 0


def _unit(v: np.ndarray) -> np.ndarray:
    return v / _safe(np.linalg.norm(v, axis=-1, keepdims=True))


def _cosine_distance(u: np.ndarray, w: np.ndarray) -> np.ndarray:
    """1 − cos between unit rows, as ½‖u − w‖²: the same number, but exact to the last digits
    when the vectors nearly agree (1 − u·w would cancel to rounding noise there). Where a row
    is zero (no direction), the distance is 1."""
    d = 0.5 * np.sum((u - w) ** 2, axis=-1)
    zero = ~(np.any(u, axis=-1) & np.any(w, axis=-1))
    return np.where(zero, 1.0, d)


# -- the picture -----------------------------------------------------------------------------------


def plot_dependency(
    dep: Dependency, path_png: str | os.PathLike, title: str = "FFN dependency"
) -> Path:
    """Write a PNG: the log-scale heatmap of M (left) and the per-block diagnostics (right)."""
    # Imported here: matplotlib is an optional dependency, and the Agg canvas is used directly
    # so that no global backend is switched in the caller's process.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    n = len(dep.blocks)
    values = dep.matrix[np.isfinite(dep.matrix)]
    positive = values[values > 0]
    low = float(positive.min()) if positive.size else 1e-6
    high = max(float(positive.max()) if positive.size else 1.0, low * 1.01)
    # A log scale needs values > 0: an exact 0 is drawn as the smallest; NaN stays blank.
    shown = np.ma.masked_invalid(np.where(dep.matrix <= 0, low, dep.matrix))

    fig = Figure(figsize=(6 + 0.25 * n + 4, 5 + 0.2 * n), layout="constrained")
    FigureCanvasAgg(fig)
    heat, diag = fig.subplots(1, 2, width_ratios=[3, 2])
    cmap = colormaps["viridis"].with_extremes(bad="#f0f0f0")
    scale = LogNorm(vmin=low, vmax=high)
    image = heat.imshow(shown, norm=scale, cmap=cmap)
    fig.colorbar(image, ax=heat, label=r"mean cos-distance$(h_j, \tilde h_j^{(i)})$")
    ticks = range(0, n, max(1, n // 16))
    heat.set_xticks(list(ticks), [str(dep.blocks[k]) for k in ticks])
    heat.set_yticks(list(ticks), [str(dep.blocks[k]) for k in ticks])
    heat.set_xlabel("block j (affected)")
    heat.set_ylabel("block i (removed)")
    heat.set_title(f"{title} — {dep.tokens} tokens")
    if n <= 12:  # small matrices: the numbers themselves are readable
        for a, b in zip(*np.nonzero(np.isfinite(dep.matrix)), strict=True):
            dark = scale(shown[a, b]) < 0.6  # viridis is dark at the low end
            heat.text(b, a, f"{dep.matrix[a, b]:.1e}", ha="center", va="center", fontsize=6,
                      color="white" if dark else "black")  # fmt: skip

    diag.semilogy(dep.blocks, dep.io_cosine_distance, "o-", label="cos-distance(f(X), X)")
    diag.semilogy(dep.blocks, dep.relative_norm, "s-", label="‖h(X)‖ / ‖X‖")
    diag.set_xlabel("block")
    diag.xaxis.set_major_locator(MaxNLocator(integer=True))  # blocks, not fractions of one
    diag.set_title("per-block diagnostics")
    diag.legend(fontsize=8)
    diag.grid(True, which="both", alpha=0.3)

    path = Path(path_png)
    with onnx_io.atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")  # no clipped labels
    return path
