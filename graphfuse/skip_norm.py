"""Residual Adds folded into the next norm, split out for matching and joined back afterwards.

onnxruntime-genai's model builder and ONNX Runtime's transformers optimizer fold each block's
residual Add into the norm that follows it::

    SkipSimplifiedLayerNormalization(x, skip, γ)  →  (γ ⊙ s / rms(s), -, -, s)     s = x + skip

so no block ends in an Add, and the stream goes on through output 3. `split` rewrites every such
node into the two ops it stands for, which the recogniser and the passes already know::

    s = Add(x, skip)          x̂ = SimplifiedLayerNormalization(s, γ)

and `join` turns every such pair back into one node once the passes are done: a pair left as
it was becomes the original node again, verbatim; the norm just after a fused run, which now
reads the run's input and the wide FFN's output, becomes a node of the same name on those
inputs (the one place outside a run that a fusion changes, and it computes what it did).

Requires: nothing. A node with a bias input, or whose mean or inverse-std outputs are read, is
left as it is (the recogniser then reports it as a near miss).
Ensures: `join(split(m))` has m's nodes; both compute what m computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

SKIP = "SkipSimplifiedLayerNormalization"
PLAIN = "SimplifiedLayerNormalization"
TAG = "graphfuse.skip_norm"  # the doc_string of split halves


@dataclass
class Split:
    """What `split` did: the original node for each norm half, by the half's output name."""

    originals: dict[str, ir.Node] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.originals)


def split(model: ir.Model) -> Split:
    """Rewrite each skip norm of ``model`` (in place) as Add + norm."""
    done = Split()
    graph = model.graph
    for node in list(graph):
        if not _splittable(node):
            continue
        x, skip, gain = node.inputs[:3]
        outputs = list(node.outputs)
        stream = outputs[3] if len(outputs) > 3 else None
        add = ir.node("Add", [x, skip], name=f"{node.name}/add", doc_string=TAG)
        add.outputs[0].name = f"{node.name or outputs[0].name}/graphfuse_sum"
        eps = node.attributes.get("epsilon")
        norm = ir.node(
            PLAIN,
            [add.outputs[0], gain],
            {"axis": -1, **({"epsilon": eps.value} if eps is not None else {})},
            name=node.name,
            doc_string=TAG,
        )
        old, new = [outputs[0]], [norm.outputs[0]]
        if stream is not None and stream.name:
            old.append(stream)
            new.append(add.outputs[0])
        name = outputs[0].name
        ir.convenience.replace_nodes_and_values(graph, node, [node], [add, norm], old, new)
        done.originals[name or ""] = node
    return done


def join(model: ir.Model, done: Split) -> None:
    """Join every split pair of ``model`` (or a pass's copy of one) into one skip norm, in place."""
    if not done:
        return
    graph = model.graph
    outputs = frozenset(graph.outputs)
    for norm in list(graph):
        ours = norm.doc_string == TAG or (norm.name or "").startswith("graphfuse/")
        if norm.op_type != PLAIN or not ours:
            continue
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        original = done.originals.get(norm.outputs[0].name or "") or _original_by_name(done, norm)
        if add is None or add.op_type != "Add" or original is None or add.graph is not graph:
            continue
        stream = add.outputs[0]
        keep_stream = len(stream.uses()) > 1 or stream in outputs
        node = ir.Node(
            original.domain,
            original.op_type,
            [*add.inputs, norm.inputs[1]],
            attributes=list(original.attributes.values()),
            num_outputs=4 if keep_stream else 1,
            name=original.name,
            doc_string=original.doc_string,
        )
        for unused in node.outputs[1:3]:
            unused.name = ""  # as the builder writes them (unnamed, onnx_ir would name them)
        old, new = [norm.outputs[0]], [node.outputs[0]]
        if keep_stream:
            old.append(stream)
            new.append(node.outputs[3])
        # in the Add's place: whatever read the stream between the two still finds it
        ir.convenience.replace_nodes_and_values(graph, add, [add, norm], [node], old, new)


def _splittable(node: ir.Node) -> bool:
    if node.op_type != SKIP or node.domain != "com.microsoft" or len(node.inputs) < 3:
        return False
    has_bias = len(node.inputs) > 3 and node.inputs[3] is not None
    stats_read = any(node.outputs[i].uses() for i in (1, 2) if i < len(node.outputs))
    stats_out = any(node.outputs[i].is_graph_output() for i in (1, 2) if i < len(node.outputs))
    return not has_bias and not stats_read and not stats_out


def _original_by_name(done: Split, norm: ir.Node) -> ir.Node | None:
    """A pass's copy of a split norm (``graphfuse/ffn3-5/<name>``) maps to its original."""
    for original in done.originals.values():
        if original.name and (norm.name or "").endswith("/" + original.name):
            return original
    return None
