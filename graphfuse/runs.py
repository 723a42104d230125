"""Group FFN blocks into runs: consecutive blocks joined by the residual stream alone.

Blocks i and i+1 can share a run when block i+1 reads exactly block i's output, that output
goes nowhere else, and the two blocks agree on what makes one wide FFN possible (eps, activation,
dtype, hidden size). For every adjacent pair that cannot, `Refusal.reason` says why — attention
between them, an interior value read elsewhere, different eps — so the user can act on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from graphfuse.blocks import FfnBlock, NearMiss
from graphfuse.graph import ATTENTION_OPS, GraphIndex


@dataclass(frozen=True)
class Run:
    """Blocks ``first..last`` (inclusive), consecutive and joined by the residual stream."""

    first: int
    last: int

    def __len__(self) -> int:
        return self.last - self.first + 1

    def __str__(self) -> str:
        return f"{self.first}-{self.last}"

    @property
    def indices(self) -> range:
        return range(self.first, self.last + 1)


@dataclass(frozen=True)
class Refusal:
    """Blocks ``left`` and ``left + 1`` cannot be in one run, because of ``reason``."""

    left: int
    reason: str


def pair_refusal(
    g: GraphIndex,
    a: FfnBlock,
    b: FfnBlock,
    misses: list[NearMiss] = (),  # type: ignore[assignment]
) -> str | None:
    """Why block ``b`` cannot follow block ``a`` in one run, or None when it can."""
    casts = no_op_casts(g, a.residual_out, b.residual_in)
    if casts is None:
        return _between(g, a, b, misses)
    for out in (a.residual_out, *(g.node(i).output[0] for i in casts[:-1])):
        if out in g.graph_outputs:
            return f"block {a.index}'s output '{out}' is a graph output"
        elsewhere = [j for j in g.users(out) if j not in b.nodes and j not in casts]
        if elsewhere:
            return f"block {a.index}'s output '{out}' also feeds node {g.label(elsewhere[0])}"
    if a.norm.eps != b.norm.eps:
        return f"eps differs: {a.norm.eps:g} vs {b.norm.eps:g}"
    if a.activation != b.activation or (a.signature != b.signature and a.activation == "other"):
        return f"activation differs: {a.activation} vs {b.activation}"
    if a.dtype != b.dtype:
        return f"dtypes differ: {a.dtype} vs {b.dtype}"
    if a.hidden != b.hidden:
        return f"hidden sizes differ: {a.hidden} vs {b.hidden}"
    return _quantised_refusal(a, b)


def _quantised_refusal(a: FfnBlock, b: FfnBlock) -> str | None:
    """Why the down projections of ``a`` and ``b`` cannot join into one, where quantised."""
    qa, qb = a.down.weight.quant, b.down.weight.quant
    if qa is None and qb is None:
        return None
    if qa is None or qb is None:
        return "one down projection is quantised (MatMulNBits) and the other is not"
    for block, q in ((a, qa), (b, qb)):
        if block.intermediate % q.block_size:
            return (
                f"block {block.index}'s I={block.intermediate} is not a multiple of its "
                f"MatMulNBits block_size {q.block_size}: the down projections cannot join exactly"
            )
    for what in ("bits", "block_size", "accuracy_level"):
        if getattr(qa, what) != getattr(qb, what):
            return f"MatMulNBits {what} differs: {getattr(qa, what)} vs {getattr(qb, what)}"
    if (qa.zero_points is None) != (qb.zero_points is None):
        return "one MatMulNBits down projection has zero points and the other has none"
    return None


def no_op_casts(g: GraphIndex, source: str, target: str) -> list[int] | None:
    """The Casts that carry ``source`` to ``target`` without changing its type (the TorchScript
    exporter writes ``x.to(float32)`` on an fp32 stream), or None if something else is there."""
    chain: list[int] = []
    value = target
    while value != source:
        at = g.producer.get(value)
        if at is None or g.node(at).op_type != "Cast" or len(chain) > 4:
            return None
        node = g.node(at)
        if g.elem_type(node.input[0]) != g.elem_type(node.output[0]):
            return None
        chain.append(at)
        value = node.input[0]
    return chain[::-1]


def _between(g: GraphIndex, a: FfnBlock, b: FfnBlock, misses: list[NearMiss]) -> str:
    """Describe what stands on the residual stream between two blocks."""
    # Nodes that depend on a's output and that b's input depends on, i.e. on a path between.
    stop = b.residual_add
    after: set[int] = set()
    frontier = [a.residual_out]
    while frontier:
        for j in g.users(frontier.pop()):
            if j < stop and j not in after and j not in b.nodes:
                after.add(j)
                frontier.extend(g.node(j).output)
    before: set[int] = set()
    frontier = [b.residual_in]
    while frontier:
        at = g.producer.get(frontier.pop())
        if at is not None and at in after and at not in before:
            before.add(at)
            frontier.extend(g.node(at).input)
    between = sorted(before)
    softmax = [j for j in between if g.node(j).op_type in ATTENTION_OPS]
    if softmax:
        return f"attention between them (node {g.label(softmax[0])})"
    refused = [m for m in misses if m.node in before]
    if refused:
        return f"a refused FFN block between them ('{refused[0].name}': {refused[0].reason})"
    if between:
        return f"{len(between)} node(s) between them, first {g.label(between[0])}"
    return f"block {b.index} does not read block {a.index}'s output"


def find_runs(
    g: GraphIndex,
    blocks: list[FfnBlock],
    misses: list[NearMiss] = (),  # type: ignore[assignment]
) -> tuple[list[Run], list[Refusal]]:
    """Maximal runs (single blocks included) and the refusal of every adjacent pair that breaks
    them."""
    runs: list[Run] = []
    refusals: list[Refusal] = []
    first = 0
    for i in range(1, len(blocks) + 1):
        reason = pair_refusal(g, blocks[i - 1], blocks[i], misses) if i < len(blocks) else ""
        if reason is None:
            continue
        runs.append(Run(first, i - 1))
        if reason:
            refusals.append(Refusal(i - 1, reason))
        first = i
    return runs, refusals
