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

import numpy as np
import onnx
from onnx import helper

from graphfuse import skip_norm
from graphfuse.blocks import FfnBlock, find_blocks
from graphfuse.canonical import canonicalize
from graphfuse.errors import GraphfuseError
from graphfuse.graph import ATTENTION_OPS, GraphIndex
from graphfuse.surgery import rebuild


@dataclass(frozen=True)
class AttentionBlock:
    layer: int  # the FFN block it feeds
    add: int  # the residual Add
    stream: str  # the residual stream it adds to
    nodes: frozenset[int]  # the attention branch
    past: tuple[str, ...]  # graph inputs this branch reads (its KV cache; maybe shared ones)
    present: tuple[str, ...]  # graph outputs this branch writes (KV cache)


@dataclass
class DropReport:
    layers: list[int]
    nodes_before: int
    nodes_after: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    removed_inputs: list[str]
    removed_outputs: list[str]


def find_attention(g: GraphIndex, blocks: list[FfnBlock]) -> dict[int, AttentionBlock]:
    """The attention sub-block feeding each FFN block, where there is one."""
    ffn_nodes = frozenset().union(*(b.nodes for b in blocks)) if blocks else frozenset()
    found = {}
    for block in blocks:
        at = g.producer.get(block.residual_in)
        if at is None or g.node(at).op_type != "Add":
            continue
        add = g.node(at)
        for stream, branch in (add.input, reversed(add.input)):
            nodes = _branch(g, branch, stream, ffn_nodes)
            if nodes is not None and any(g.node(i).op_type in ATTENTION_OPS for i in nodes):
                past = tuple(
                    v for v in _read_inputs(g, nodes)
                    if all(j in nodes for j in g.users(v))
                )  # fmt: skip
                present = tuple(
                    v for i in sorted(nodes) for v in g.node(i).output if v in g.graph_outputs
                )
                found[block.index] = AttentionBlock(
                    block.index, at, stream, frozenset(nodes), past, present
                )
                break
    return found


def _branch(g: GraphIndex, value: str, stream: str, ffn_nodes: frozenset[int]) -> set[int] | None:
    """Nodes computing ``value`` back to ``stream``; None if that reaches into an FFN block."""
    nodes: set[int] = set()
    stack = [value]
    seen = {stream}
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        at = g.producer.get(v)
        if at is None:
            continue
        if at in ffn_nodes:
            return None
        nodes.add(at)
        stack.extend(i for i in g.node(at).input if i)
    return nodes


def _read_inputs(g: GraphIndex, nodes: set[int]) -> list[str]:
    return sorted({v for i in nodes for v in g.node(i).input if v in g.graph_inputs})


def kv_bytes_per_token(model: onnx.ModelProto, names: set[str] | None = None) -> int:
    """Bytes one token adds to the KV cache: Σ over `past` inputs [batch, heads, seq, dim]."""
    total = 0
    for value in model.graph.input:
        if names is not None and value.name not in names:
            continue
        t = value.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        if len(dims) != 4 or not value.name.startswith("past"):
            continue
        size = np.dtype(helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        total += dims[1] * dims[3] * size
    return total


def drop_attention(
    model: onnx.ModelProto, layers: list[int], base_dir=None
) -> tuple[onnx.ModelProto, DropReport]:
    """Remove the attention of ``layers``; returns the new model and what changed."""
    original = model
    model, _ = canonicalize(model, base_dir)
    model, split = skip_norm.split(model)
    g = GraphIndex(model, base_dir)
    blocks, _ = find_blocks(g)
    attention = find_attention(g, blocks)
    missing = [j for j in layers if j not in attention]
    if missing:
        have = ", ".join(map(str, sorted(attention))) or "none"
        raise GraphfuseError(
            f"no attention found before FFN block(s) {', '.join(map(str, missing))} "
            f"(layers with attention: {have})"
        )
    chosen = [attention[j] for j in sorted(set(layers))]
    rename = {g.node(a.add).output[0]: a.stream for a in chosen}
    removed = {a.add for a in chosen}
    nodes = []
    for i, node in enumerate(g.nodes):
        if i in removed:
            out = node.output[0]
            if out in g.graph_outputs:  # keep the output's name: copy the stream into it
                nodes.append(helper.make_node("Identity", [rename.pop(out)], [out], name=node.name))
            continue
        if any(v in rename for v in node.input):
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [_resolve(rename, v) for v in node.input]
            node = copy
        nodes.append(node)
    drop_outputs = {v for a in chosen for v in a.present}
    new = skip_norm.join(rebuild(g, nodes, drop_outputs=drop_outputs), split)
    # A cache input goes once nothing reads it; inputs the layers share (the mask, positions,
    # shapes taken from one layer's cache) are still read and stay.
    read = {v for n in new.graph.node for v in n.input}
    drop_inputs = {v for a in chosen for v in a.past if v not in read}
    kept = [v for v in new.graph.input if v.name not in drop_inputs]
    del new.graph.input[:]
    new.graph.input.extend(kept)
    report = DropReport(
        layers=[a.layer for a in chosen],
        nodes_before=len(original.graph.node),
        nodes_after=len(new.graph.node),
        kv_bytes_per_token_before=kv_bytes_per_token(original),
        kv_bytes_per_token_after=kv_bytes_per_token(new),
        removed_inputs=sorted(drop_inputs),
        removed_outputs=sorted(drop_outputs),
    )
    return new, report


def gate_attention(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[int, str]]:
    """A copy where each layer's attention output is multiplied by a scalar graph input
    ``attention_gate.<layer>`` before its residual Add: feeding 0 removes that attention
    exactly, so one session scores the removal of every layer (the importance scan)."""
    model, _ = canonicalize(model)
    model, split = skip_norm.split(model)
    g = GraphIndex(model)
    blocks, _ = find_blocks(g)
    attention = find_attention(g, blocks)
    gated = onnx.ModelProto()
    gated.CopyFrom(model)
    nodes = list(gated.graph.node)
    gates: dict[int, str] = {}
    for layer, a in sorted(attention.items(), reverse=True):  # back to front: positions hold
        add = nodes[a.add]
        branch = add.input[1] if add.input[0] == a.stream else add.input[0]
        gate, scaled = f"attention_gate.{layer}", f"graphfuse/attention{layer}/gated"
        nodes.insert(a.add, helper.make_node("Mul", [branch, gate], [scaled], name=scaled))
        add.input[list(add.input).index(branch)] = scaled
        elem = g.elem_type(add.output[0]) or onnx.TensorProto.FLOAT
        gated.graph.input.append(helper.make_tensor_value_info(gate, elem, []))
        gates[layer] = gate
    del gated.graph.node[:]
    gated.graph.node.extend(nodes)
    return skip_norm.join(gated, split), dict(sorted(gates.items()))


def _resolve(rename: dict[str, str], value: str) -> str:
    # Consecutive removed layers chain: layer j's stream may itself be a removed Add's output.
    while value in rename:
        value = rename[value]
    return value
