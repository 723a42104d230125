"""Choose which runs to fuse from the dependency matrix M (the paper's greedy selection).

Candidates are the contiguous sub-ranges a..b (at least two blocks) of the model's fusable
maximal runs. A candidate's score is the largest M[i, j] inside it (a ≤ i < j ≤ b); the sum is
kept beside it. Candidates are tried from the lowest score up — on a tie the longer one first,
since it saves more FFN stages, then the lower sum — and each one is kept, until the budget is
met (a candidate that overlaps chosen runs is tried as their union, one longer run):

- ``target_stages``: stop once FFN stages = n_blocks − Σ(len(run) − 1) ≤ target;
- ``max_increase`` with ``check``: keep a candidate only if ``check(chosen + [candidate])``
  (e.g. validation perplexity of the model fused with those runs) ≤ baseline × (1 +
  max_increase), baseline = ``check([])``; otherwise try the next one.

Both budgets may be given together. With ``keep_last`` (the paper's Table 5) a candidate a..b is
scored as a whole but fused as a..b−1: its last block stays a sequential stage after the wide
FFN, and no other run may take it.

The max of a range is at least the max of any range inside it, so the lowest scores belong to
short candidates: unless a longer run ties, pairs come first. ``max_length`` bounds the fused
length (the paper used at most four blocks when parallelising whole blocks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from graphfuse.analysis import Dependency
from graphfuse.errors import GraphfuseError

RunPair = tuple[int, int]


@dataclass(frozen=True)
class Candidate:
    span: RunPair  # the blocks a..b it occupies and is scored over
    fused: RunPair  # the blocks it fuses: a..b, or a..b−1 with keep_last
    max: float
    sum: float

    @property
    def saves(self) -> int:
        return self.fused[1] - self.fused[0]


@dataclass
class Decision:
    """One candidate the greedy looked at, and what became of it."""

    span: str
    fused: str
    score_max: float
    score_sum: float
    kept: bool
    value: float | None  # what check() returned, if it was asked
    stages: int  # FFN stages after this decision
    reason: str


@dataclass
class Selection:
    runs: list[RunPair]  # fused runs, in block order: ready for graphfuse.fuse(runs=...)
    stages_before: int
    stages_after: int
    baseline: float | None  # check([]), if a check was given
    decisions: list[Decision]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def candidates(
    dependency: Dependency | np.ndarray,
    runs: Sequence[RunPair],
    *,
    keep_last: bool = False,
    max_length: int | None = None,
) -> tuple[list[Candidate], int]:
    """Every scored candidate inside ``runs``, best first, and how many had unmeasured pairs."""
    at = _lookup(dependency)
    found, unmeasured = [], 0
    shortest = 3 if keep_last else 2  # with keep_last, a..b fuses b − a blocks
    for first, last in (_pair(r) for r in runs):
        for a in range(first, last + 1):
            for b in range(a + shortest - 1, last + 1):
                fused = (a, b - 1) if keep_last else (a, b)
                if max_length is not None and fused[1] - fused[0] + 1 > max_length:
                    break
                values = [at(i, j) for i in range(a, b + 1) for j in range(i + 1, b + 1)]
                if any(math.isnan(v) for v in values):
                    unmeasured += 1
                    continue
                found.append(Candidate((a, b), fused, max(values), math.fsum(values)))
    found.sort(key=lambda c: (c.max, -c.saves, c.sum, c.span))
    return found, unmeasured


def select_runs(
    dependency: Dependency | np.ndarray,
    runs: Sequence[RunPair],
    *,
    n_blocks: int | None = None,
    target_stages: int | None = None,
    max_increase: float | None = None,
    check: Callable[[list[RunPair]], float] | None = None,
    keep_last: bool = False,
    max_length: int | None = None,
) -> Selection:
    """Greedily choose runs to fuse (see the module docstring).

    ``dependency``: a `Dependency`, or a square array indexed by block number.
    ``runs``: the fusable maximal runs as (first, last) (e.g. ``inspect(m).fusable()``).
    ``n_blocks``: FFN blocks in the model; by default the size of ``dependency``, which must
    then cover every block.
    """
    if target_stages is None and max_increase is None:
        raise GraphfuseError("select_runs needs a budget: target_stages, max_increase, or both")
    if (max_increase is None) != (check is None):
        raise GraphfuseError("max_increase and check go together: check measures the increase")
    if max_increase is not None and max_increase < 0:
        raise GraphfuseError(f"max_increase must be ≥ 0, got {max_increase}")
    if max_length is not None and max_length < 2:
        raise GraphfuseError("max_length must be at least 2")
    stages = _n_blocks(dependency) if n_blocks is None else n_blocks
    found, unmeasured = candidates(dependency, runs, keep_last=keep_last, max_length=max_length)
    selection = Selection([], stages, stages, None, [])
    if unmeasured:
        selection.notes.append(
            f"{unmeasured} candidate(s) skipped: they hold block pairs M was not measured for"
        )
    limit = math.inf
    if check is not None:
        selection.baseline = float(check([]))
        limit = selection.baseline * (1 + max_increase)  # type: ignore[operator]

    by_span = {c.span: c for c in found}
    taken: list[Candidate] = []
    for c in found:
        if target_stages is not None and stages <= target_stages:
            break
        overlapping = [t for t in taken if c.span[0] <= t.span[1] and t.span[0] <= c.span[1]]
        if overlapping:
            # A candidate that overlaps chosen runs grows them: the union is one run (all lie
            # in one maximal run), scored as a whole. Pairs come first, so without this the
            # first pairs chosen would block every longer run through them.
            union = (min(c.span[0], *(t.span[0] for t in overlapping)),
                     max(c.span[1], *(t.span[1] for t in overlapping)))  # fmt: skip
            grown = by_span.get(union)
            if keep_last or grown is None or grown.saves <= sum(t.saves for t in overlapping):
                continue
            c = Candidate(grown.span, grown.fused, max(grown.max, c.max), grown.sum)
        rest = [t for t in taken if t not in overlapping]
        gain = c.saves - sum(t.saves for t in overlapping)
        trial = sorted([t.fused for t in rest] + [c.fused])
        value = None
        if check is not None:
            value = float(check(trial))
            if not value <= limit:  # NaN fails too
                selection.decisions.append(
                    _decision(c, False, value, stages,
                              f"{value:.6g} > {limit:.6g} = baseline {selection.baseline:.6g} × "
                              f"(1 + {max_increase:g})")
                )  # fmt: skip
                continue
        taken = [*rest, c]
        stages -= gain
        reason = f"lowest max M among the candidates left, saves {gain} stage(s)"
        if value is not None:
            reason += f"; {value:.6g} ≤ {limit:.6g}"
        selection.decisions.append(_decision(c, True, value, stages, reason))

    selection.runs = sorted(t.fused for t in taken)
    selection.stages_after = stages
    if target_stages is not None and stages > target_stages:
        selection.notes.append(
            f"target of {target_stages} FFN stages not reached: {stages} remain once no "
            "candidate is left that fits (non-overlapping"
            + (", within max_increase)" if check is not None else ")")
        )
    return selection


def _decision(c: Candidate, kept: bool, value: float | None, stages: int, reason: str) -> Decision:
    return Decision(
        f"{c.span[0]}-{c.span[1]}", f"{c.fused[0]}-{c.fused[1]}", c.max, c.sum, kept, value,
        stages, reason,
    )  # fmt: skip


def _pair(run) -> RunPair:
    """(first, last) from a pair or a `graphfuse.runs.Run`."""
    if hasattr(run, "first"):
        return int(run.first), int(run.last)
    first, last = run
    return int(first), int(last)


def _lookup(dependency: Dependency | np.ndarray) -> Callable[[int, int], float]:
    if isinstance(dependency, Dependency):
        where = {b: k for k, b in enumerate(dependency.blocks)}
        measured = dependency.matrix

        def at_block(i: int, j: int) -> float:
            if i not in where or j not in where:
                return math.nan
            return float(measured[where[i], where[j]])

        return at_block
    matrix = np.asarray(dependency, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise GraphfuseError(f"the dependency matrix must be square, got {list(matrix.shape)}")

    def at(i: int, j: int) -> float:
        return float(matrix[i, j]) if max(i, j) < len(matrix) else math.nan

    return at


def _n_blocks(dependency: Dependency | np.ndarray) -> int:
    if not isinstance(dependency, Dependency):
        return len(dependency)
    if dependency.blocks != list(range(len(dependency.blocks))):
        raise GraphfuseError(
            "n_blocks is needed: the dependency covers only some blocks "
            f"({dependency.blocks[0]}-{dependency.blocks[-1]}), not the whole model"
        )
    return len(dependency.blocks)
