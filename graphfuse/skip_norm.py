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

import onnx
from onnx import helper

from graphfuse.surgery import empty_like

SKIP = "SkipSimplifiedLayerNormalization"
PLAIN = "SimplifiedLayerNormalization"
TAG = "graphfuse.skip_norm"  # the doc_string of split halves


@dataclass
class Split:
    """What `split` did: the original node for each norm half, by the half's output name."""

    originals: dict[str, onnx.NodeProto] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.originals)


def split(model: onnx.ModelProto) -> tuple[onnx.ModelProto, Split]:
    """A copy of ``model`` (weights shared, not copied) with each skip norm as Add + norm."""
    done = Split()
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        if not _splittable(node):
            nodes.append(node)
            continue
        x, skip, gain = node.input[:3]
        out = list(node.output) + [""] * (4 - len(node.output))
        stream = out[3] or f"{node.name or out[0]}/graphfuse_sum"
        eps = next((a for a in node.attribute if a.name == "epsilon"), None)
        nodes.append(
            helper.make_node("Add", [x, skip], [stream], name=f"{node.name}/add", doc_string=TAG)
        )
        norm = helper.make_node(PLAIN, [stream, gain], [out[0]], name=node.name, doc_string=TAG)
        norm.attribute.extend([eps] if eps is not None else [])
        norm.attribute.append(helper.make_attribute("axis", -1))
        nodes.append(norm)
        done.originals[out[0]] = node
    if not done:
        return model, done
    return _with_nodes(model, nodes), done


def join(model: onnx.ModelProto, done: Split) -> onnx.ModelProto:
    """``model`` with every split pair (or a pass's copy of one) joined into one skip norm."""
    if not done:
        return model
    producer = {v: n for n in model.graph.node for v in n.output}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for v in n.input:
            readers[v] = readers.get(v, 0) + 1
    outputs = {v.name for v in model.graph.output}
    joined: dict[int, onnx.NodeProto] = {}  # id(Add) -> the skip norm that replaces it
    dropped: set[int] = set()
    for norm in model.graph.node:
        ours = norm.doc_string == TAG or norm.name.startswith("graphfuse/")
        if norm.op_type != PLAIN or not ours:
            continue
        add = producer.get(norm.input[0])
        original = done.originals.get(norm.output[0]) or _original_by_name(done, norm)
        if add is None or add.op_type != "Add" or original is None or id(add) in joined:
            continue
        stream = add.output[0]
        keep_stream = readers.get(stream, 0) > 1 or stream in outputs
        same = (
            list(original.input[:3]) == [*add.input, norm.input[1]]
            and original.output[0] == norm.output[0]
            and keep_stream == bool(original.output[3:4] and original.output[3])
        )
        if same:
            node = original
        else:
            node = onnx.NodeProto()
            node.CopyFrom(original)
            node.input[:] = [*add.input, norm.input[1]]
            node.output[:] = [norm.output[0], "", "", stream if keep_stream else ""]
        joined[id(add)] = node
        dropped.add(id(norm))
    if not joined:
        return model
    nodes = [joined.get(id(n), n) for n in model.graph.node if id(n) not in dropped]
    return _with_nodes(model, nodes)


def _splittable(node: onnx.NodeProto) -> bool:
    if node.op_type != SKIP or node.domain != "com.microsoft" or len(node.input) < 3:
        return False
    has_bias = len(node.input) > 3 and bool(node.input[3])
    stats_read = any(node.output[i] for i in (1, 2) if i < len(node.output))
    return not has_bias and not stats_read


def _original_by_name(done: Split, norm: onnx.NodeProto) -> onnx.NodeProto | None:
    """A pass's copy of a split norm (``graphfuse/ffn3-5/<name>``) maps to its original."""
    for original in done.originals.values():
        if original.name and norm.name.endswith("/" + original.name):
            return original
    return None


def _with_nodes(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> onnx.ModelProto:
    """A copy of ``model`` with ``nodes`` (weights shared, not copied)."""
    out = empty_like(model)
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(model.graph.initializer)
    out.graph.value_info.extend(model.graph.value_info)
    return out
