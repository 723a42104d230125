"""Group FFN blocks into runs: consecutive blocks joined by the residual stream alone.

Blocks i and i+1 can share a run when block i+1 reads exactly block i's output, that output
goes nowhere else, and the two blocks agree on what makes one wide FFN possible (eps, activation,
dtype, hidden size). For every adjacent pair that cannot, `Refusal.reason` says why — attention
between them, an interior value read elsewhere, different eps — so the user can act on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_ir as ir

from graphfuse.blocks import FfnBlock, NearMiss
from graphfuse.ir import ATTENTION_OPS, elem_type, label, producer, readers, values
from graphfuse.ir import order as node_order


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
    graph: ir.Graph,
    a: FfnBlock,
    b: FfnBlock,
    misses: list[NearMiss] = (),  # type: ignore[assignment]
    named: dict[str, ir.Value] | None = None,
) -> str | None:
    """Why block ``b`` cannot follow block ``a`` in one run, or None when it can."""
    named = named if named is not None else values(graph)
    source, target = named[a.residual_out], named[b.residual_in]
    casts = no_op_casts(source, target)
    if casts is None:
        return _between(graph, source, target, b, misses)
    outputs = frozenset(graph.outputs)
    for out in (source, *(c.outputs[0] for c in casts[:-1])):
        if out in outputs:
            return f"block {a.index}'s output '{out.name}' is a graph output"
        elsewhere = [n for n in readers(out) if n not in b.nodes and n not in casts]
        if elsewhere:
            return f"block {a.index}'s output '{out.name}' also feeds node {label(elsewhere[0])}"
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


def no_op_casts(source: ir.Value, target: ir.Value) -> list[ir.Node] | None:
    """The Casts that carry ``source`` to ``target`` without changing its type (the TorchScript
    exporter writes ``x.to(float32)`` on an fp32 stream), or None if something else is there."""
    chain: list[ir.Node] = []
    value = target
    while value is not source:
        node = producer(value, "Cast")
        if node is None or len(chain) > 4:
            return None
        if elem_type(node.inputs[0]) != elem_type(node.outputs[0]):
            return None
        chain.append(node)
        value = node.inputs[0]  # type: ignore[assignment]
    return chain[::-1]


def _between(
    graph: ir.Graph, source: ir.Value, target: ir.Value, b: FfnBlock, misses: list[NearMiss]
) -> str:
    """Describe what stands on the residual stream between two blocks."""
    order = node_order(graph)
    # Nodes that depend on a's output and that b's input depends on, i.e. on a path between.
    stop = order[b.residual_add]
    after: set[ir.Node] = set()
    frontier = [source]
    while frontier:
        for node in readers(frontier.pop()):
            if order[node] < stop and node not in after and node not in b.nodes:
                after.add(node)
                frontier.extend(node.outputs)
    before: set[ir.Node] = set()
    stack: list[ir.Value | None] = [target]
    while stack:
        made = producer(stack.pop())
        if made is not None and made in after and made not in before:
            before.add(made)
            stack.extend(made.inputs)
    between = sorted(before, key=order.__getitem__)
    attention = [n for n in between if n.op_type in ATTENTION_OPS]
    if attention:
        return f"attention between them (node {label(attention[0])})"
    positions = {order[n] for n in before}
    refused = [m for m in misses if m.node in positions]
    if refused:
        return f"a refused FFN block between them ('{refused[0].name}': {refused[0].reason})"
    if between:
        return f"{len(between)} node(s) between them, first {label(between[0])}"
    return f"block {b.index} does not read block {b.index - 1}'s output"


def find_runs(
    graph: ir.Graph,
    blocks: list[FfnBlock],
    misses: list[NearMiss] = (),  # type: ignore[assignment]
) -> tuple[list[Run], list[Refusal]]:
    """Maximal runs (single blocks included) and the refusal of every adjacent pair that breaks
    them."""
    runs: list[Run] = []
    refusals: list[Refusal] = []
    first = 0
    named = values(graph)
    for i in range(1, len(blocks) + 1):
        last = i == len(blocks)
        reason = "" if last else pair_refusal(graph, blocks[i - 1], blocks[i], misses, named)
        if reason is None:
            continue
        runs.append(Run(first, i - 1))
        if reason:
            refusals.append(Refusal(i - 1, reason))
        first = i
    return runs, refusals
