"""A read-only index over an ONNX graph: who produces and who consumes each value, and which
values are constants.

Nodes are identified by their position in ``graph.node`` (ONNX graphs are topologically sorted,
so position is also execution order). Constant data is read lazily — an initializer stored as
external data is only read from disk when a pass asks for its values — so indexing a model of
many gigabytes costs the size of its protobuf, not of its weights.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

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


class GraphIndex:
    """Producer/consumer maps and constant look-up for one ONNX graph."""

    def __init__(self, model: onnx.ModelProto, base_dir: Path | str | None = None) -> None:
        self.model = model
        self.graph = model.graph
        self.base_dir = str(base_dir) if base_dir is not None else ""
        self.nodes = list(self.graph.node)
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for i, node in enumerate(self.nodes):
            for name in node.output:
                if name:
                    self.producer[name] = i
            for name in node.input:
                if name:
                    self.consumers[name].append(i)
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.constant_nodes = {
            node.output[0]: i
            for i, node in enumerate(self.nodes)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
        }
        self.graph_inputs = {v.name for v in self.graph.input}
        self.graph_outputs = {v.name for v in self.graph.output}
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self._inferred: dict[str, onnx.TypeProto] | None = None
        self._types: dict[str, onnx.TypeProto] = {
            v.name: v.type for v in (*self.graph.input, *self.graph.output, *self.graph.value_info)
        }

    # -- structure ---------------------------------------------------------------------------

    def node(self, i: int) -> onnx.NodeProto:
        return self.nodes[i]

    def producer_of(self, value: str) -> onnx.NodeProto | None:
        i = self.producer.get(value)
        return None if i is None else self.nodes[i]

    def users(self, value: str) -> list[int]:
        """Positions of the nodes that read ``value``."""
        return self.consumers.get(value, [])

    def label(self, i: int) -> str:
        node = self.nodes[i]
        return f"'{node.name or node.output[0]}' ({node.op_type})"

    # -- constants ---------------------------------------------------------------------------

    def is_constant(self, value: str) -> bool:
        # An initializer that is also a graph input can be overridden at run time: not constant.
        return (
            value in self.initializers and value not in self.graph_inputs
        ) or value in self.constant_nodes

    def tensor(self, value: str) -> onnx.TensorProto | None:
        if value in self.initializers and value not in self.graph_inputs:
            return self.initializers[value]
        if value in self.constant_nodes:
            node = self.nodes[self.constant_nodes[value]]
            for attr in node.attribute:
                if attr.name == "value":
                    return attr.t
        return None

    def shape_of_constant(self, value: str) -> tuple[int, ...] | None:
        tensor = self.tensor(value)
        return None if tensor is None else tuple(tensor.dims)

    def dtype_of_constant(self, value: str) -> int | None:
        tensor = self.tensor(value)
        return None if tensor is None else tensor.data_type

    def constant(self, value: str) -> np.ndarray | None:
        """The constant's values (read from external data when stored there), or None."""
        tensor = self.tensor(value)
        if tensor is None:
            return None
        return numpy_helper.to_array(tensor, self.base_dir)

    def scalar(self, value: str) -> float | None:
        """A constant with exactly one element, as a Python float."""
        shape = self.shape_of_constant(value)
        if shape is None or int(np.prod(shape)) != 1:
            return None
        array = self.constant(value)
        return None if array is None else float(array.reshape(()).astype(np.float64))

    # -- types -------------------------------------------------------------------------------

    def type_of(self, value: str) -> onnx.TypeProto | None:
        """A value's type as declared or inferred (with its shape where inference knows it)."""
        return self._types.get(value) or self._inferred_types().get(value)

    def elem_type(self, value: str) -> int | None:
        """The element type of a value, where the graph declares it."""
        tensor = self.tensor(value)
        if tensor is not None:
            return tensor.data_type
        type_proto = self.type_of(value)
        if type_proto is not None and type_proto.HasField("tensor_type"):
            return type_proto.tensor_type.elem_type or None
        return None

    def _inferred_types(self) -> dict[str, onnx.TypeProto]:
        """Types from ONNX shape inference, run once on a weight-free copy of the graph."""
        if self._inferred is None:
            light = onnx.ModelProto()
            light.ir_version = self.model.ir_version
            light.opset_import.extend(self.model.opset_import)
            graph = light.graph  # inference needs dims and types, not weight data
            for field in ("node", "input", "output", "value_info"):
                getattr(graph, field).extend(getattr(self.graph, field))
            for tensor in self.graph.initializer:
                if tensor.data_location != onnx.TensorProto.EXTERNAL and _size(tensor) <= 64:
                    graph.initializer.append(tensor)  # shapes and axes: inference reads them
                else:
                    graph.initializer.add(
                        name=tensor.name, dims=tensor.dims, data_type=tensor.data_type
                    )
            # Inference is a convenience here: where it fails, types stay unknown.
            with contextlib.suppress(Exception):
                light = onnx.shape_inference.infer_shapes(light, strict_mode=False)
            self._inferred = {v.name: v.type for v in light.graph.value_info}
        return self._inferred


def _size(tensor: onnx.TensorProto) -> int:
    size = 1
    for d in tensor.dims:
        size *= d
    return size


def attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for attr in node.attribute:
        if attr.name == name:
            return onnx.helper.get_attribute_value(attr)
    return default
