"""Graph surgery shared by the passes: build the output model from an edited node list.

A pass decides which nodes the new graph holds (and which graph inputs and outputs go);
`rebuild` then removes what that left dead — nodes no output depends on any more, initializers
nobody reads, stale value_info — while whatever was already dead in the input stays as the user
had it. Weights are not copied: initializer protos are shared with the input model.
"""

from __future__ import annotations

import onnx

from graphfuse.errors import GraphfuseError
from graphfuse.graph import GraphIndex


def rebuild(
    g: GraphIndex,
    nodes: list[onnx.NodeProto],
    new_tensors: list[onnx.TensorProto] = (),  # type: ignore[assignment]
    *,
    drop_outputs: set[str] = frozenset(),  # type: ignore[assignment]
    drop_inputs: set[str] = frozenset(),  # type: ignore[assignment]
) -> onnx.ModelProto:
    """A model with ``nodes`` (in order) in place of ``g``'s, cleaned of what the edit left dead."""
    outputs = g.graph_outputs - drop_outputs
    live_before = live_nodes(g.nodes, g.graph_outputs)
    live_after = live_nodes(nodes, outputs)
    dead = {id(n) for n in nodes if id(n) not in live_after and id(n) in live_before}
    nodes = [n for n in nodes if id(n) not in dead]

    read = {v for n in nodes for v in n.input} | outputs
    read_before = {v for n in g.nodes for v in n.input} | g.graph_outputs
    model = empty_like(g.model)
    graph = model.graph
    del graph.input[:]
    del graph.output[:]
    graph.input.extend(v for v in g.graph.input if v.name not in drop_inputs)
    graph.output.extend(v for v in g.graph.output if v.name not in drop_outputs)
    graph.node.extend(nodes)
    for tensor in g.graph.initializer:
        if tensor.name in read or tensor.name not in read_before:
            graph.initializer.append(tensor)
    graph.initializer.extend(new_tensors)
    produced = {v for n in nodes for v in n.output}
    graph.value_info.extend(v for v in g.graph.value_info if v.name in produced or v.name in read)
    return model


def live_nodes(nodes: list[onnx.NodeProto], outputs: set[str]) -> set[int]:
    """ids of the nodes that some graph output depends on."""
    producer = {v: n for n in nodes for v in n.output}
    live: set[int] = set()
    stack = [producer[v] for v in outputs if v in producer]
    while stack:
        node = stack.pop()
        if id(node) in live:
            continue
        live.add(id(node))
        stack.extend(producer[v] for v in node.input if v in producer)
    return live


def empty_like(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` without its nodes, initializers and value_info (weights not copied)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip={"graph"})
    _copy_fields(model.graph, shell.graph, skip={"node", "initializer", "value_info"})
    return shell


def _copy_fields(src, dst, skip: set[str]) -> None:
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(dst, field.name).extend(value)
        elif field.message_type is not None:
            getattr(dst, field.name).CopyFrom(value)
        else:
            setattr(dst, field.name, value)


def with_outputs(model: onnx.ModelProto, values: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns ``values`` (interior values or graph inputs), typed
    as declared or inferred — shapes where inference knows them, which the checker wants."""
    g = GraphIndex(model)
    types = {}
    for value in dict.fromkeys(values):
        if value not in g.producer and value not in g.graph_inputs:
            raise GraphfuseError(f"cannot expose '{value}': no node computes it")
        known = g.type_of(value)
        if known is None or not known.tensor_type.elem_type:
            raise GraphfuseError(
                f"cannot expose '{value}': its type is unknown (shape inference failed there); "
                "add value_info for it"
            )
        types[value] = known
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # the one copy of the weights
    present = {v.name for v in copy.graph.output}
    for value, type_proto in types.items():
        if value not in present:
            copy.graph.output.append(onnx.helper.make_value_info(value, type_proto))
    return copy


def only_outputs(model: onnx.ModelProto, values: list[str]) -> onnx.ModelProto:
    """``model`` computing only ``values``: its own outputs dropped, and with them everything
    that fed only them (an LLM's vocabulary projection, the layers after the last value)."""
    exposed = with_outputs(model, values)
    g = GraphIndex(exposed)
    drop = {v.name for v in exposed.graph.output} - set(values)
    return rebuild(g, list(g.nodes), drop_outputs=drop)
