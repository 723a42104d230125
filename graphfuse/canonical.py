"""Canonicalisation before matching: fold the constants that exporters spell as nodes.

Exporters write the constants of an RMSNorm and an FFN in more ways than the recogniser should
have to know. This pass folds them back into initializers, so that every later stage sees one
spelling::

    Constant ─▶ CastLike(·, mean) ─▶ Add            eps (initializer) ─▶ Add
    Constant ─┐
    Constant ─┴▶ Reshape ─▶ ReduceMean      ==>     axes (initializer) ─▶ ReduceMean
    W ─▶ Identity ─▶ MatMul                          W ─▶ MatMul

What it folds — the *constant subgraph* — is every default-domain node whose inputs are all
constants (initializers that are not graph inputs, or outputs of constant nodes), plus a
``CastLike`` whose data input is constant (its second input only lends its element type).
The folding itself is onnxscript's (`onnxscript.optimizer.fold_constants`, then onnx_ir's
`LiftConstantsToInitializersPass` and `RemoveUnusedNodesPass`), run on a small model holding
only that subgraph, so that its rewrites can reach no other node (its ``should_fold`` callback
cannot promise that: onnxscript 0.7 asks it only after a node's own rewrites — Identity aliasing,
static Shape/Size, no-op Cast — and then renames the whole model): the rest of the graph keeps
its nodes, op types, order, names, custom domains (com.microsoft …), ir_version and opset
imports; consumers of a folded value read the new initializer of the same name, and consumers
of an ``Identity`` of a constant read the constant itself.

Pre-conditions: a topologically sorted graph (as ONNX requires). Weights are never read: an
initializer of rank two or more, or over ``size_limit`` elements, enters the folding model only
as a typed placeholder, so no weight bytes are loaded and external initializers keep their
``location``/``offset``/``length`` exactly. Ensures: what the model computes is unchanged, graph
inputs and outputs keep their names, every node input is defined, and a model with no constant
subgraph comes back as the very same object.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import external_data_helper, helper

from graphfuse.errors import GraphfuseError
from graphfuse.ir import remove_dead

if TYPE_CHECKING:
    import onnx_ir as ir

# Constants folded at most this many elements in and out (64 K: an RMSNorm gain of the widest
# models, a shape, an eps). Weight matrices are excluded by rank whatever their size.
DEFAULT_SIZE_LIMIT = 1 << 16

# The nodes standing for "the rest of the graph" in the folding model: they read the constant
# values the rest reads, so the folder rewires them (Identity elimination) and keeps those
# values alive. Their domain has no opset import, so no evaluator ever applies to them.
_BOUNDARY_DOMAIN = "graphfuse.canonical"
_BOUNDARY_GROUP = 64
_PROVENANCE = "graphfuse.canonical"

# Ops never folded: their result depends on more than their inputs' values.
_NOT_CONSTANT = frozenset(
    {"RandomUniform", "RandomNormal", "RandomUniformLike", "RandomNormalLike", "Multinomial"}
)

logger = logging.getLogger(__name__)


@dataclass
class CanonicalReport:
    """What canonicalisation changed."""

    nodes_before: int
    nodes_after: int
    folded: dict[str, int] = field(default_factory=dict)  # op type → nodes folded away
    initializers_added: int = 0
    kept: list[str] = field(default_factory=list)  # constant nodes the folder left, and why
    notes: list[str] = field(default_factory=list)

    @property
    def modified(self) -> bool:
        return bool(self.folded)


def canonicalize(
    model: onnx.ModelProto,
    base_dir: Path | str | None = None,
    *,
    size_limit: int = DEFAULT_SIZE_LIMIT,
    in_place: bool = False,
) -> tuple[onnx.ModelProto, CanonicalReport]:
    """Fold ``model``'s constant subgraph into initializers; return the model and a report.

    ``base_dir`` is where the model's external data lives: small external constants (an eps, a
    shape) are read from it to be folded; without it they are left as they are. ``in_place``
    edits ``model`` itself instead of a copy (for a proto the caller owns: copying an inline
    model costs its size in memory). A model with nothing to fold is returned as is."""
    graph = model.graph
    report = CanonicalReport(len(graph.node), len(graph.node))
    chosen = _constant_subgraph(model, base_dir, size_limit)
    report.kept.extend(chosen.untyped)
    if not chosen.nodes:
        return model, report
    if (problem := _first_undefined(graph)) is not None:
        report.notes.append(f"constants left as exported: the graph is out of order ({problem})")
        return model, report
    try:
        import onnx_ir as ir
        import onnxscript.optimizer
    except ImportError:
        report.notes.append(
            "constants left as exported: onnxscript is not installed (pip install onnxscript)"
        )
        return model, report

    sub = ir.serde.deserialize_model(chosen.folding_model(model))
    if base_dir is not None:
        ir.external_data.set_base_dir(sub.graph, str(base_dir))
    sub_nodes = list(sub.graph)
    origin = {id(node): i for node, i in zip(sub_nodes, chosen.nodes, strict=False)}
    boundary_nodes = sub_nodes[len(chosen.nodes) :]
    onnxscript.optimizer.fold_constants(
        sub,
        onnx_shape_inference=True,
        input_size_limit=size_limit,
        output_size_limit=size_limit,
        # an Identity of a constant is an alias: its readers are rewired, nothing is copied
        should_fold=lambda node: False if node.op_type == "Identity" else None,
    )
    ir.passes.common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(sub)
    remove_dead(sub)

    read = [value for node in boundary_nodes for value in node.inputs]
    resolved = dict(zip(chosen.boundary, read, strict=True))
    aliases = {b: v.name for b, v in resolved.items() if v is not None and v.name not in (b, None)}
    remaining = [n for n in sub.graph if n.domain != _BOUNDARY_DOMAIN]
    _rename_clashes(remaining, origin, graph, chosen)
    left: list[tuple[tuple[int, int], onnx.NodeProto]] = []
    changed = new_nodes = 0
    key = (-1, 0)
    for node in remaining:
        i = origin.get(id(node))
        if i is None:
            # a node the folder made in place of one it removed: it reads constants and what
            # the nodes before it made, so right after the one before it is a valid place
            key = (key[0], key[1] + 1)
            left.append((key, ir.serde.serialize_node(node)))
            new_nodes += 1
            continue
        proto = graph.node[i]
        key = (i, 0)
        if _same_wiring(node, proto):
            left.append((key, proto))
        else:  # the same node reading what its inputs were folded or aliased to
            left.append((key, ir.serde.serialize_node(node)))
            changed += 1
        report.kept.append(
            f"{proto.op_type} '{proto.name or proto.output[0]}': left by onnxscript's folder "
            f"(no evaluator, an op it keeps, or a result over {size_limit} elements)"
        )
    kept_positions = {k[0] for k, _ in left if k[1] == 0}
    report.folded = dict(
        Counter(graph.node[i].op_type for i in chosen.nodes if i not in kept_positions)
    )
    if not (report.folded or new_nodes or changed or aliases):
        return model, report

    new_initializers = _new_initializers(resolved.values(), remaining, chosen.initializers)
    out = model if in_place else _copy(model)
    _rewrite(out.graph, chosen, left, aliases, new_initializers)
    report.nodes_after = len(out.graph.node)
    report.initializers_added = len(new_initializers)
    if (problem := _first_undefined(out.graph)) is not None:
        raise GraphfuseError(f"internal error: after folding constants, {problem}")
    return out, report


@dataclass
class _ConstantSubgraph:
    nodes: list[int]  # positions in graph.node, in order
    boundary: list[str]  # their outputs that the rest of the graph reads
    initializers: dict[str, onnx.TensorProto]  # every initializer that is not a graph input
    small: set[str]  # initializers the folder may read
    targets: dict[str, int]  # CastLike type sources outside the subgraph → element type
    untyped: list[str]  # CastLike nodes of constants left out: no type to cast to

    def folding_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The subgraph alone: small initializers as they are, every other value it reads as a
        typed graph input (no data), and boundary nodes reading what the rest of the graph
        reads."""
        graph = model.graph
        nodes = [graph.node[i] for i in self.nodes]
        produced = {o for n in nodes for o in n.output}
        read = dict.fromkeys(x for n in nodes for x in n.input if x and x not in produced)
        placeholders = []
        for name in read:
            if name in self.targets:
                placeholders.append(helper.make_tensor_value_info(name, self.targets[name], None))
            elif name not in self.small:
                t = self.initializers[name]
                placeholders.append(helper.make_tensor_value_info(name, t.data_type, t.dims))
        # in groups: onnx_ir scans a node's inputs to rewire one, and the graph's outputs to
        # remove a node, so one node reading everything, or one per value, is quadratic
        boundary = [
            helper.make_node(
                "Boundary",
                self.boundary[k : k + _BOUNDARY_GROUP],
                [f"{_BOUNDARY_DOMAIN}/{k}"],
                domain=_BOUNDARY_DOMAIN,
            )
            for k in range(0, len(self.boundary), _BOUNDARY_GROUP)
        ]
        sub = helper.make_graph(
            [*nodes, *boundary],
            "constant_subgraph",
            placeholders,
            [onnx.ValueInfoProto(name=n.output[0]) for n in boundary],
            [self.initializers[name] for name in read if name in self.small],
        )
        return helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)


def _constant_subgraph(
    model: onnx.ModelProto, base_dir: Path | str | None, size_limit: int
) -> _ConstantSubgraph:
    graph = model.graph
    graph_inputs = {v.name for v in graph.input}
    initializers = {t.name: t for t in graph.initializer if t.name not in graph_inputs}

    def readable(t: onnx.TensorProto) -> bool:
        external = external_data_helper.uses_external_data(t)
        return (
            len(t.dims) <= 1
            and int(np.prod(t.dims)) <= size_limit
            and (base_dir is not None or not external)
        )

    small = {name for name, t in initializers.items() if readable(t)}
    # values the rest of the graph must still find under their own name
    protected = {v.name for v in graph.output} | _subgraph_reads(graph)
    types: dict[str, int] | None = None
    constant = set(initializers)
    nodes: list[int] = []
    targets: dict[str, int] = {}
    untyped: list[str] = []
    for i, node in enumerate(graph.node):
        if not _foldable_op(node) or protected.intersection(node.output):
            continue
        data = node.input[:1] if node.op_type == "CastLike" else node.input
        if not all(x in constant for x in data if x):
            continue
        if node.op_type != "Identity" and any(x in initializers and x not in small for x in data):
            continue  # a weight, or a constant this pass may not read
        if node.op_type == "CastLike" and (like := node.input[1]) not in constant:
            if types is None:
                types = _element_types(model)
            if not types.get(like):  # nothing to cast to
                untyped.append(
                    f"CastLike '{node.name or node.output[0]}': the type of '{like}' is unknown"
                )
                continue
            targets[like] = types[like]
        nodes.append(i)
        constant.update(o for o in node.output if o)

    inside = set(nodes)
    read_elsewhere = {x for i, n in enumerate(graph.node) if i not in inside for x in n.input}
    boundary = [o for i in nodes for o in graph.node[i].output if o and o in read_elsewhere]
    return _ConstantSubgraph(nodes, boundary, initializers, small, targets, untyped)


def _foldable_op(node: onnx.NodeProto) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type in _NOT_CONSTANT:
        return False
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        return False  # control flow
    # a sparse Constant is not lifted by onnx_ir; leave it for the runtime
    return not (
        node.op_type == "Constant" and any(a.name == "sparse_value" for a in node.attribute)
    )


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every value name read inside the subgraphs of ``graph``'s nodes (outer-scope reads)."""
    names: set[str] = set()
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names.update(x for n in sub.node for x in n.input)
                names.update(v.name for v in sub.output)
                names |= _subgraph_reads(sub)
    return names


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every value ONNX shape inference can type, inferred on a copy of the
    graph without initializer data (each initializer becomes a typed input)."""
    graph = model.graph
    declared = {v.name for v in graph.input}
    inputs = list(graph.input) + [
        helper.make_tensor_value_info(t.name, t.data_type, t.dims)
        for t in graph.initializer
        if t.name not in declared
    ]
    bare = helper.make_graph(
        graph.node, graph.name, inputs, graph.output, value_info=graph.value_info
    )
    probe = helper.make_model(bare, opset_imports=model.opset_import, ir_version=model.ir_version)
    probe.functions.extend(model.functions)
    try:
        inferred = onnx.shape_inference.infer_shapes(probe).graph
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        logger.info("no type inference for CastLike targets: %s", e)
        inferred = probe.graph
    return {
        v.name: v.type.tensor_type.elem_type
        for v in [*inferred.input, *inferred.value_info, *inferred.output]
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type
    }


def _same_wiring(node: ir.Node, proto: onnx.NodeProto) -> bool:
    """Whether the folder left ``node`` as it came in (then its original proto is kept)."""
    return (
        node.op_type == proto.op_type
        and [v.name if v is not None else "" for v in node.inputs] == list(proto.input)
        and [v.name for v in node.outputs] == list(proto.output)
    )


def _new_initializers(
    resolved, remaining: list[ir.Node], original: dict[str, onnx.TensorProto]
) -> list[onnx.TensorProto]:
    """The folded values the graph now reads, as tensors tagged with what they were folded
    from (original initializers, only ever read by name, are not among them)."""
    import onnx_ir as ir
    from onnxscript.optimizer import FOLDED_FROM_KEY

    values = [*resolved, *(v for n in remaining for v in n.inputs)]
    tensors: dict[str, onnx.TensorProto] = {}
    for value in values:
        if value is None or not value.is_initializer() or value.name in original:
            continue
        if value.name in tensors or value.const_value is None:
            continue
        tensor = ir.serde.serialize_tensor(value.const_value)
        tensor.name = value.name
        sources = value.meta.get(FOLDED_FROM_KEY)
        tensor.doc_string = (
            f"{_PROVENANCE}: folded from {', '.join(sorted(sources))}"
            if sources
            else f"{_PROVENANCE}: lifted from a Constant node"
        )
        tensors[value.name] = tensor
    return list(tensors.values())


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _rewrite(
    graph: onnx.GraphProto,
    chosen: _ConstantSubgraph,
    left: list[tuple[tuple[int, int], onnx.NodeProto]],
    aliases: dict[str, str],
    new_initializers: list[onnx.TensorProto],
) -> None:
    """Replace the constant subgraph of ``graph`` by what the folder left of it."""
    removed = set(chosen.nodes)
    inputs_of_removed = {x for i in chosen.nodes for x in graph.node[i].input}
    outputs_of_removed = {x for i in chosen.nodes for x in graph.node[i].output}
    entries = list(left)
    for i, node in enumerate(graph.node):
        if i not in removed:
            entries.append(((i, 0), node))
    entries.sort(key=lambda e: e[0])
    # copies, taken before the graph lets go of the originals; readers of an alias renamed
    nodes = []
    for _, node in entries:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        if aliases.keys() & set(copy.input):
            copy.input[:] = [aliases.get(x, x) for x in copy.input]
        nodes.append(copy)
    del graph.node[:]
    graph.node.extend(nodes)

    read = {x for n in graph.node for x in n.input} | {v.name for v in graph.output}
    read |= _subgraph_reads(graph)
    for k in reversed(range(len(graph.initializer))):
        name = graph.initializer[k].name
        if name in inputs_of_removed and name not in read:
            del graph.initializer[k]
    graph.initializer.extend(new_initializers)
    gone = outputs_of_removed - {o for n in graph.node for o in n.output}
    for k in reversed(range(len(graph.value_info))):
        if graph.value_info[k].name in gone:  # now an initializer, or no more
            del graph.value_info[k]


def _rename_clashes(
    remaining: list[ir.Node],
    origin: dict[int, int],
    graph: onnx.GraphProto,
    chosen: _ConstantSubgraph,
) -> None:
    """Give the values of nodes the folder made names no other value of the graph has (its
    names are unique in the folding model only)."""
    ours = {o for i in chosen.nodes for o in graph.node[i].output}
    taken = {o for n in graph.node for o in n.output} | {t.name for t in graph.initializer}
    taken |= {v.name for v in graph.input}
    for node in remaining:
        if id(node) in origin:
            continue
        for value in node.outputs:
            if value.name in ours:  # it stands for an output of the node it replaced
                continue
            name = value.name or "folded"
            while name in taken:
                name = f"{_PROVENANCE}/{name}"
            value.name = name
            taken.add(name)


def _first_undefined(graph: onnx.GraphProto) -> str | None:
    """Why ``graph`` is not a valid ONNX graph in order — a value read before anything defines
    it, or defined twice — or None."""
    defined = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        where = f"{node.op_type} '{node.name or node.output[0]}'"
        missing = [x for x in node.input if x not in defined]
        if missing:
            return f"{where} reads '{missing[0]}', which nothing before it defines"
        twice = [x for x in node.output if x in defined and x]
        if twice:
            return f"{where} defines '{twice[0]}' again"
        defined.update(node.output)
    return None
