"""Attention removal: turn the attention sub-block of chosen layers into the identity.

    X ─┬──────────────────────────────┐                X ───────────────── X'
       └─ norm ─ attention(past) ─ Add ─ X'    →      (the layer's KV cache
                         └─ present                     inputs and outputs gone)

This is how consecutive FFNs arise (Puzzle, arXiv 2411.19146): once layer j has no attention,
FFN j-1 feeds FFN j directly and the two can be fused. A layer's attention is the residual Add
that produces the input of FFN block j, on the branch holding a Softmax (or an Attention op)
that does not reach back into any FFN block. Everything only that branch used goes: its nodes,
its weights, the `past` inputs it read and the `present` outputs it wrote.

Layer numbers are FFN-block indices (one FFN per layer), as `graphfuse inspect` prints them.
Requires: a graph where each layer is attention-residual then FFN-residual (Llama and kin).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnx_ir as ir

from graphfuse import ir as irs
from graphfuse import skip_norm
from graphfuse.blocks import FfnBlock, find_blocks
from graphfuse.canonical import canonicalize
from graphfuse.errors import GraphfuseError
from graphfuse.ir import ATTENTION_OPS, elem_type, producer


@dataclass(frozen=True)
class AttentionBlock:
    layer: int  # the FFN block it feeds
    add: ir.Node  # the residual Add
    stream: ir.Value  # the residual stream it adds to
    nodes: frozenset[ir.Node]  # the attention branch
    past: tuple[ir.Value, ...]  # graph inputs only this branch reads (its KV cache)
    present: tuple[ir.Value, ...]  # graph outputs this branch writes (KV cache)


@dataclass
class DropReport:
    layers: list[int]
    nodes_before: int
    nodes_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    removed_inputs: list[str]
    removed_outputs: list[str]


def find_attention(model: ir.Model, blocks: list[FfnBlock]) -> dict[int, AttentionBlock]:
    """The attention sub-block feeding each FFN block, where there is one."""
    graph = model.graph
    ffn_nodes = frozenset().union(*(b.nodes for b in blocks)) if blocks else frozenset()
    named = irs.values(graph)
    inputs = frozenset(graph.inputs)
    outputs = frozenset(graph.outputs)
    found = {}
    for block in blocks:
        add = producer(named[block.residual_in], "Add")
        if add is None or len(add.inputs) != 2:
            continue
        for stream, branch in (add.inputs, reversed(add.inputs)):
            nodes = _branch(branch, stream, ffn_nodes)  # type: ignore[arg-type]
            if nodes is not None and any(n.op_type in ATTENTION_OPS for n in nodes):
                read = {v for n in nodes for v in n.inputs if v in inputs}
                past = tuple(
                    sorted((v for v in read if all(u.node in nodes for u in v.uses())),
                           key=lambda v: v.name or "")
                )  # fmt: skip
                present = tuple(v for n in nodes for v in n.outputs if v in outputs)
                found[block.index] = AttentionBlock(
                    block.index,
                    add,
                    stream,  # type: ignore[arg-type]
                    frozenset(nodes),
                    past,
                    present,
                )
                break
    return found


def _branch(value: ir.Value, stream: ir.Value, ffn_nodes: frozenset) -> set[ir.Node] | None:
    """Nodes computing ``value`` back to ``stream``; None if that reaches into an FFN block."""
    nodes: set[ir.Node] = set()
    stack = [value]
    seen = {stream}
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = v.producer()
        if node is None:
            continue
        if node in ffn_nodes:
            return None
        nodes.add(node)
        stack.extend(i for i in node.inputs if i is not None)
    return nodes


def kv_bytes_per_token(model: ir.Model) -> int:
    """Bytes one token adds to the KV cache: Σ over `past` inputs [batch, heads, seq, dim]."""
    total = 0
    for value in model.graph.inputs:
        shape = value.shape
        if shape is None or len(shape) != 4 or not (value.name or "").startswith("past"):
            continue
        heads, dim = shape[1], shape[3]
        if isinstance(heads, int) and isinstance(dim, int) and value.dtype is not None:
            total += int(heads * dim * value.dtype.itemsize)
    return total


class DropAttention(irs.Pass):
    """Remove the attention of ``layers`` (FFN-block numbers); the report is a `DropReport`.
    The model must be canonical (`graphfuse.canonical`); its skip norms are split for matching
    and joined again."""

    def __init__(self, layers: list[int]) -> None:
        super().__init__()
        self.layers = sorted(set(layers))

    def call(self, model: ir.Model) -> irs.Result:
        graph = model.graph
        nodes_before, kv_before = len(graph), kv_bytes_per_token(model)
        split = skip_norm.split(model)
        blocks, _ = find_blocks(model)
        attention = find_attention(model, blocks)
        missing = [j for j in self.layers if j not in attention]
        if missing:
            have = ", ".join(map(str, sorted(attention))) or "none"
            raise GraphfuseError(
                f"no attention found before FFN block(s) {', '.join(map(str, missing))} "
                f"(layers with attention: {have})"
            )
        chosen = [attention[j] for j in self.layers]
        # Back to front: consecutive removed layers chain (layer j's stream may be the output of
        # layer j-1's removed Add), so each Add is replaced by a stream that is still there.
        for a in reversed(chosen):
            out = a.add.outputs[0]
            if out.is_graph_output():  # keep the output's name: copy the stream into it
                identity = ir.node("Identity", [a.stream], name=a.add.name)
                ir.convenience.replace_nodes_and_values(
                    graph, a.add, [a.add], [identity], [out], [identity.outputs[0]]
                )
            else:
                ir.convenience.replace_all_uses_with(out, a.stream)
        dropped_outputs = {v for a in chosen for v in a.present}
        graph.outputs[:] = [v for v in graph.outputs if v not in dropped_outputs]
        irs.remove_dead(model)
        # A cache input goes once nothing reads it; inputs the layers share (the mask,
        # positions, shapes taken from one layer's cache) are still read and stay.
        dropped_inputs = {v for a in chosen for v in a.past if not v.uses()}
        graph.inputs[:] = [v for v in graph.inputs if v not in dropped_inputs]
        skip_norm.join(model, split)
        report = DropReport(
            layers=[a.layer for a in chosen],
            nodes_before=nodes_before,
            nodes_after=len(graph),
            kv_bytes_per_token_before=kv_before,
            kv_bytes_per_token_after=kv_bytes_per_token(model),
            removed_inputs=sorted(v.name or "" for v in dropped_inputs),
            removed_outputs=sorted(v.name or "" for v in dropped_outputs),
        )
        return irs.Result(model, modified=True, report=report)


class GateAttention(irs.Pass):
    """Multiply each layer's attention output by a scalar graph input ``attention_gate.<layer>``
    before its residual Add: feeding 0 removes that attention exactly, so one session scores the
    removal of every layer (the importance scan). The report maps layers to their gate inputs."""

    def call(self, model: ir.Model) -> irs.Result:
        split = skip_norm.split(model)
        blocks, _ = find_blocks(model)
        gates: dict[int, str] = {}
        for layer, a in sorted(find_attention(model, blocks).items()):
            branch = a.add.inputs[1] if a.add.inputs[0] is a.stream else a.add.inputs[0]
            assert branch is not None
            elem = elem_type(a.add.outputs[0]) or onnx.TensorProto.FLOAT
            gate = ir.Value(name=f"attention_gate.{layer}", type=ir.TensorType(ir.DataType(elem)),
                            shape=ir.Shape([]))  # fmt: skip
            model.graph.inputs.append(gate)
            scaled = ir.node("Mul", [branch, gate], name=f"graphfuse/attention{layer}/gated")
            scaled.outputs[0].name = f"graphfuse/attention{layer}/gated"
            model.graph.insert_before(a.add, scaled)
            a.add.replace_input_with(list(a.add.inputs).index(branch), scaled.outputs[0])
            gates[layer] = f"attention_gate.{layer}"
        skip_norm.join(model, split)
        return irs.Result(model, modified=bool(gates), report=gates)


def drop_attention(
    model: onnx.ModelProto, layers: list[int], base_dir=None
) -> tuple[onnx.ModelProto, DropReport]:
    """Remove the attention of ``layers`` from a proto; returns the new model and its report."""
    canonical, _ = canonicalize(model, base_dir)
    result = DropAttention(layers)(irs.from_proto(canonical, base_dir))
    result.report.nodes_before = len(model.graph.node)  # as given, before constants were folded
    return irs.to_proto(result.model), result.report


def gate_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[int, str]]:
    """A copy of a proto with every attention gated (`GateAttention`), and the gates."""
    canonical, _ = canonicalize(model)
    result = GateAttention()(irs.from_proto(canonical))
    return irs.to_proto(result.model), result.report
