"""The one graph representation: onnx_ir, and the few look-ups the recogniser and passes share.

Every stage works on an ``onnx_ir.Model``: a value knows its producer (``value.producer()``) and
its readers (``value.uses()``), an initializer its tensor (``value.const_value``). External
weights stay on disk until something reads them (onnx_ir maps them lazily), and `save` writes
one data file beside the output, a tensor at a time, new weights included (a pass stores them
as ``ir.LazyTensor``, made when written), so memory stays near one tensor, not one model.
Protos appear only at the edges: ONNX Runtime sessions, the checker, the user's own objects.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from graphfuse.errors import GraphfuseError

# Element-wise ops whose output has the shape of the broadcast of their inputs and which act on
# each element independently: the building blocks of activations and of norm epilogues.
ELEMENTWISE = frozenset(
    {
        "Abs", "Add", "Cast", "CastLike", "Div", "Erf", "Exp", "Gelu", "HardSigmoid", "Identity",
        "Log", "Mul", "Neg", "Pow", "Reciprocal", "Relu", "Sigmoid", "Sqrt", "Sub", "Swish",
        "Tanh",
    }
)  # fmt: skip

# Ops that normalise over the last axis: the single reduction an RMSNorm island may hold.
NORM_OPS = frozenset({"ReduceMean", "RMSNormalization", "SimplifiedLayerNormalization"})

# Ops that mark an attention sublayer.
ATTENTION_OPS = frozenset({"Softmax", "Attention", "GroupQueryAttention", "MultiHeadAttention"})

# Protobuf cannot serialise a message over 2 GB; leave room for the graph itself.
INLINE_LIMIT = 1 << 30


# -- models in and out -------------------------------------------------------------------------


def from_proto(
    proto: onnx.ModelProto, base_dir: Path | str | None = None, *, check_data: bool = True
) -> ir.Model:
    """``proto`` as an IR model (tensors wrapped, not copied); external data is read from
    ``base_dir`` when a pass asks for it, and only from plain files inside it."""
    if base_dir is not None and check_data:
        from graphfuse.onnx_io import check_external_data

        check_external_data(proto, Path(base_dir))
    try:
        model = ir.serde.deserialize_model(proto)
    except ir.serde.SerdeError as e:
        cause: BaseException = e
        while cause.__cause__ is not None:  # each level quotes the whole node or graph
            cause = cause.__cause__
        raise GraphfuseError(
            f"cannot read the model into onnx_ir ({str(cause).splitlines()[0]}); graphfuse works on what onnx_ir "
            "reads (a sparse Constant, for one, it does not: make it dense)"
        ) from None
    if base_dir is not None:
        ir.external_data.set_base_dir(model.graph, str(base_dir))
    return model


def load(path: str | Path, *, check_data: bool = True) -> ir.Model:
    """A model file as an IR model; its external weights stay on disk until read. Without
    ``check_data``, data files are not looked at now (a missing one fails only when read;
    onnx_ir still refuses a location outside the folder then)."""
    proto = onnx.load(str(path), load_external_data=False)
    return from_proto(proto, Path(path).resolve().parent, check_data=check_data)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def runnable(model: ir.Model) -> onnx.ModelProto:
    """``model`` as a proto with its external weights read in (ONNX Runtime takes a model from
    bytes only with its weights inside); for a clone or a model of the caller's own, since its
    tensors are replaced by in-memory ones."""
    ir.external_data.load_to_model(model)
    return to_proto(model)


def needs_external_data(model: ir.Model) -> bool:
    """Whether ``model`` must be written with a data file: it reads one now (its weights must not
    point back into the input's), or it is too big for one protobuf message."""
    tensors = [v.const_value for v in model.graph.initializers.values()]
    if any(isinstance(t, ir.ExternalTensor) for t in tensors):
        return True
    return sum(t.nbytes for t in tensors if t is not None) > INLINE_LIMIT


def save(model: ir.Model, path: Path, *, external: bool | None = None) -> None:
    """Write ``model`` to ``path``, with external data in ``<name>.data`` beside it when it
    needs one. The caller makes it atomic (`graphfuse.onnx_io.save`). Each input tensor's
    mapping is released once written, so the pages of the input's data file are not all held
    at the end."""
    if external is None:
        external = needs_external_data(model)
    written: list[ir.ExternalTensor] = []

    def release(tensor, _info) -> None:
        while written:
            written.pop().release()
        if isinstance(tensor, ir.ExternalTensor):
            written.append(tensor)

    try:
        ir.save(
            model,
            path,
            external_data=path.name + ".data" if external else None,
            size_threshold_bytes=1024,
            callback=release,
        )
    finally:
        for tensor in written:
            tensor.release()


# -- values ------------------------------------------------------------------------------------


def tensor(value: ir.Value | None, *, defaults: bool = False) -> ir.TensorProtocol | None:
    """The constant behind ``value``: an initializer's tensor or a Constant node's; None for a
    computed value, or for an initializer that is also a graph input (a run may override it),
    unless ``defaults`` (then its default value counts, as TensorRT's parser takes it)."""
    if value is None or (value.is_graph_input() and not defaults):
        return None
    node = value.producer()
    if node is not None and node.op_type == "Constant" and "value" in node.attributes:
        # onnx_ir's get_const_tensor would rename this tensor, and it may wrap the caller's
        # own proto (from_proto does not copy): read it as it is
        return node.attributes["value"].as_tensor()
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:  # a malformed Constant: not a constant we can read
        return None


def is_constant(value: ir.Value | None) -> bool:
    return tensor(value) is not None


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The constant's values (read from external data when stored there), or None."""
    t = tensor(value)
    return None if t is None else read(t)


def read(t: ir.TensorProtocol) -> np.ndarray:
    """A tensor's values. An external tensor is read through a map of its data file that is
    let go at once: onnx_ir keeps a map (and its pages count in the process's memory) until
    released, so reading every weight of a model would otherwise hold all of them."""
    if isinstance(t, ir.ExternalTensor):
        array = t.numpy().copy()
        t.release()
        return array
    return t.numpy()


def constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    t = tensor(value)
    return None if t is None else tuple(t.shape.numpy())


def scalar(value: ir.Value | None) -> float | None:
    """A constant with exactly one element, as a Python float."""
    shape = constant_shape(value)
    if shape is None or int(np.prod(shape)) != 1:
        return None
    return float(np.asarray(constant(value)).reshape(()).astype(np.float64))


def elem_type(value: ir.Value | None) -> int | None:
    """A value's element type (TensorProto's number), where known."""
    if value is None:
        return None
    t = tensor(value)
    dtype = t.dtype if t is not None else value.dtype
    return None if dtype is None else int(dtype)


def rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def producer(value: ir.Value | None, op_type: str | None = None) -> ir.Node | None:
    """The node computing ``value`` (only if it is an ``op_type``, when given)."""
    node = None if value is None else value.producer()
    if node is None or (op_type is not None and node.op_type != op_type):
        return None
    return node


def readers(value: ir.Value) -> list[ir.Node]:
    """The nodes reading ``value``, each once, in no particular order."""
    return list(dict.fromkeys(use.node for use in value.uses()))


def attr(node: ir.Node, name: str, default: object = None) -> object:
    found = node.attributes.get(name)
    return default if found is None else found.value


def label(node: ir.Node) -> str:
    return f"'{node.name or node.outputs[0].name}' ({node.op_type})"


def infer_types(model: ir.Model) -> None:
    """Fill in the element types and shapes ONNX shape inference can give (weights are not sent
    to it), with `onnx.shape_inference.infer_shapes`' defaults: no type check, since one input
    of an unexpected type would fail the whole inference, and the checker (`trt_check`) sees
    exactly such models. Where inference fails, what was declared stays (onnx_ir's notes on that
    are silenced: an unknown type is reported where it matters)."""
    with _quiet("onnx_ir.passes.common.shape_inference"):
        infer = ir.passes.common.ShapeInferencePass
        infer(check_type=False, strict_mode=False, data_prop=False)(model)


@contextmanager
def _quiet(logger: str):
    """Only errors from ``logger`` while the block runs."""
    quiet = logging.getLogger(logger)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quiet.setLevel(level)


def with_outputs(model: ir.Model, names: list[str], *, only: bool = False) -> ir.Model:
    """A clone of ``model`` (tensors shared) that also returns the values ``names`` (interior
    values or graph inputs), or, with ``only``, returns just those and computes nothing else.
    Each must have a known element type (declared or inferred), which a runtime wants."""
    clone = model.clone()
    named = values(clone.graph)
    wanted = []
    for name in dict.fromkeys(names):
        value = named.get(name)
        if value is None or value.is_initializer():
            raise GraphfuseError(f"cannot expose '{name}': no node computes it")
        wanted.append(value)
    if any(v.dtype is None for v in wanted):
        infer_types(clone)
    for value in wanted:
        if value.dtype is None:
            raise GraphfuseError(
                f"cannot expose '{value.name}': its type is unknown (shape inference failed "
                "there); add value_info for it"
            )
    outputs = clone.graph.outputs
    if only:
        outputs.clear()
    outputs.extend(v for v in wanted if v not in outputs)
    if only:
        remove_dead(clone)
    return clone


def values(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of ``graph``: inputs, initializers and node outputs."""
    return ir.convenience.create_value_mapping(graph)


def order(graph: ir.Graph) -> dict[ir.Node, int]:
    """Each node's position: the graph is topologically sorted, so position is execution order."""
    return {node: i for i, node in enumerate(graph)}


def remove_dead(model: ir.Model) -> None:
    """Remove the nodes and initializers no graph output depends on (onnx_ir's pass; its notes
    on ops without an ONNX schema, logged with a stack each, are silenced)."""
    with _quiet("onnx_ir.passes.common.unused_removal"):
        ir.passes.common.RemoveUnusedNodesPass()(model)


# -- passes ------------------------------------------------------------------------------------


@dataclass
class Result(ir.passes.PassResult):
    """A graphfuse pass's result: the model (edited in place) and what the pass did."""

    report: Any = None


class Pass(ir.passes.InPlacePass):
    """The shape of every graphfuse pass: an onnx_ir in-place pass, model in, `Result` (model and
    report) out, checked after it runs: every node reads only values defined before it (the
    graph is still in order), and every graph output is still computed, under the name and
    element type it had (a pass may drop outputs, as attention removal drops the KV cache; it
    never renames or retypes one)."""

    def __call__(self, model: ir.Model | ir.passes.PassResult, /) -> Result:
        result = super().__call__(model)
        assert isinstance(result, Result), type(result)
        return result

    def requires(self, model: ir.Model) -> None:
        self._outputs = {v.name: v.dtype for v in model.graph.outputs}

    def ensures(self, model: ir.Model) -> None:
        if (problem := out_of_order(model.graph)) is not None:
            raise ir.passes.PostconditionError(f"{type(self).__name__}: {problem}")
        for value in model.graph.outputs:
            if value.name not in self._outputs or self._outputs[value.name] != value.dtype:
                raise ir.passes.PostconditionError(
                    f"{type(self).__name__}: graph output '{value.name}' is new or retyped"
                )


def out_of_order(graph: ir.Graph) -> str | None:
    """Why ``graph`` is not in order (a node reads a value nothing before it defines), or None."""
    defined = {*graph.inputs, *graph.initializers.values()}
    for node in graph:
        for value in node.inputs:
            if value is not None and value not in defined:
                return f"{label(node)} reads '{value.name}' before anything defines it"
        defined.update(node.outputs)
    missing = [v.name for v in graph.outputs if v not in defined]
    return f"graph output '{missing[0]}' is computed by no node" if missing else None


def copy_node(
    node: ir.Node, inputs: Iterable[ir.Value | None], prefix: str, doc: str | None = None
) -> ir.Node:
    """A node like ``node`` (op, domain, attributes) on ``inputs``, named ``prefix/<its name>``,
    with outputs named ``prefix/<their name>`` (an unnamed optional output stays unnamed)."""
    copy = ir.Node(
        node.domain,
        node.op_type,
        list(inputs),
        attributes=list(node.attributes.values()),
        overload=node.overload,
        num_outputs=len(node.outputs),
        name=f"{prefix}/{node.name or node.outputs[0].name}",
        doc_string=node.doc_string if doc is None else doc,
        version=node.version,
    )
    for new, old in zip(copy.outputs, node.outputs, strict=True):
        new.name = f"{prefix}/{old.name}" if old.name else ""
        new.type = old.type  # not its shape: a copy may compute a wider value
    return copy
