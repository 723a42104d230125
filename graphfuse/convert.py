"""Convert an fp32 ONNX model to fp16 or bf16, keeping norms and reductions in fp32 islands.

    x ─┬─ Pow(2) ─ ReduceMean ─ Add(eps) ─ Sqrt ─ Reciprocal ─┐          fp32 island
       └──────────────────────────────────────────────────────Mul ─ Mul(γ) ─ Cast ─▶ MatMul …
       (Cast to fp32 where a low-precision tensor enters)                      (fp16/bf16)

Why islands: in fp16, x² overflows above |x| ≈ 256 (65504 is fp16's largest value), so an
RMSNorm computed in fp16 returns inf/0 on the large activations LLMs have; long sums
(ReduceMean, Softmax) lose precision in both fp16 and bf16. Everything else (MatMuls, SiLU,
elementwise ops, data movement) runs in the low type; float weights are stored in it.

Rules, in order:
- Seeds kept in fp32: `KEEP_FP32_OPS` (reductions, norms, Pow/Sqrt/Reciprocal/Exp/Log, ops with
  float control inputs), squares `Mul(x, x)`, nodes with subgraphs, and nodes of non-standard
  domains except `LOW_CONTRIB_OPS`.
- An island grows through Add/Sub/Mul/Div/Neg whose float inputs come from fp32 nodes, constants,
  or the island's own input (the `x` of `Mul(x, 1/rms)`), so the whole RMSNorm chain, gain
  included, stays fp32 while the residual Add beside it does not.
- Cast(to=float) produces the low type unless all its consumers are fp32.
- A Cast is inserted on each edge whose producer and consumer precisions differ; constants are
  converted (or duplicated, when shared by both precisions) instead of cast at run time.

Existing tools were checked: onnxconverter-common's float16 converter and
onnxruntime.transformers.float16 (op block lists) write fp16 only, and NVIDIA ModelOpt AutoCast
(fp16/bf16, the path TensorRT 11 documents) pins onnx/onnxruntime-gpu versions this project
cannot take. Hence this small converter, one code path for both types.

ONNX Runtime's own ops, as onnxruntime-genai's model builder and ONNX Runtime's transformer
optimizer write them: the norms (`SimplifiedLayerNormalization`, written in the ONNX domain, and
`Skip[Simplified]LayerNormalization`) are fp32 islands like the decomposed ones, so the residual
stream that `SkipSimplifiedLayerNormalization` carries (its output 3) stays fp32 too. The ops
that compute like a MatMul (`GroupQueryAttention`, `RotaryEmbedding`, `MatMulNBits`) run in
fp16: all their float inputs share one type T, and ONNX Runtime's CPU provider has fp16 kernels
for them (bf16 ones for none). So an attention's KV cache is fp16 too.

Pre-conditions: float tensors are FLOAT (fp32) and typed by shape inference or the model's
value_info (which is how ONNX Runtime ops, unknown to onnx, get types); opset >= 13 for bf16
Casts; control-flow nodes may only read outer-scope tensors that stay fp32. Post-condition: the
checker passes and shape inference types every converted tensor; for a model with ops that
onnx does not know (which neither can check), ONNX Runtime's CPU provider instead builds a
session: it checks every node against its schema, ONNX Runtime's own ops included, and finds a
kernel for its types.

Works on an `onnx_ir` model: a value's producer, readers and type say everything the rules
ask. Weights are converted as the model is written (`ir.LazyTensor`s), a tensor at a time, and
a model file's external weights are read one at a time too, so a weight's fp32 and low copies
are never all held at once.
"""

from __future__ import annotations

import itertools
import os
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto

from graphfuse import ir as irs
from graphfuse.errors import GraphfuseError

FP32 = ir.DataType.FLOAT
TENSOR, GRAPH, GRAPHS = ir.AttributeType.TENSOR, ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS
LOW_TYPES = {"fp16": ir.DataType.FLOAT16, "bf16": ir.DataType.BFLOAT16}
_NUMPY_LOW = {"fp16": np.dtype(np.float16), "bf16": np.dtype(ml_dtypes.bfloat16)}
_FP16_MAX = float(np.finfo(np.float16).max)
_PROVENANCE = "graphfuse.convert"

KEEP_FP32_OPS = frozenset({
    # reductions and normalisations (long sums; x² overflows fp16)
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceProd", "Softmax", "LogSoftmax", "CumSum", "LayerNormalization",
    "RMSNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
    "LpNormalization", "MeanVarianceNormalization",
    "SimplifiedLayerNormalization",  # ONNX Runtime's RMSNorm, in the ONNX domain
    # the RMSNorm chain and other overflow-prone elementwise math
    "Pow", "Sqrt", "Reciprocal", "Exp", "Log",
    # float control inputs or attributes that must stay fp32
    "Range", "Resize", "Upsample", "Dropout", "RandomNormal", "RandomNormalLike",
    "RandomUniform", "RandomUniformLike", "Multinomial", "Bernoulli", "EyeLike",
})  # fmt: skip
_ISLAND_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Neg"})
_STANDARD = ("", "ai.onnx")
# ONNX Runtime ops that compute in the low type like a MatMul: one type T for every float input
# and output, and fp16 kernels in ONNX Runtime's CPU provider (1.32: GroupQueryAttention,
# RotaryEmbedding and MatMulNBits register float and float16, no bfloat16). Each maps to the
# positions of float inputs fixed at fp32 (GroupQueryAttention's k_scale, v_scale of a quantised
# cache): a node that has one stays fp32, since a Cast would change them too.
LOW_CONTRIB_OPS: dict[tuple[str, str], tuple[int, ...]] = {
    ("com.microsoft", "GroupQueryAttention"): (12, 13),
    ("com.microsoft", "RotaryEmbedding"): (),
    ("com.microsoft", "MatMulNBits"): (),
}
# Not classified: Cast is decided from its readers; Constant values are converted per reader;
# Shape and Size read either precision and output integers.
_SKIP = frozenset({"Cast", "Constant", "Shape", "Size"})


@dataclass
class ConversionReport:
    """What `convert_precision` did; `fp32_nodes` are the islands left in fp32."""

    dtype: str
    low_nodes: int = 0
    fp32_nodes: list[str] = field(default_factory=list)
    casts_inserted: int = 0
    initializers_converted: int = 0
    values_clamped: int = 0  # fp32 weights beyond the fp16 range, clamped to +-65504


def _node_name(node: ir.Node, index: int) -> str:
    return node.name or f"#{index} ({node.op_type})"


def _runs_low(node: ir.Node) -> bool:
    """An ONNX Runtime op that computes in the low type (see `LOW_CONTRIB_OPS`)."""
    fixed = LOW_CONTRIB_OPS.get((node.domain, node.op_type))
    inputs = node.inputs
    return fixed is not None and not any(i < len(inputs) and inputs[i] is not None for i in fixed)


def _unknown_ops(model: ir.Model) -> list[str]:
    """Ops that onnx's checker and shape inference do not know: ONNX Runtime's own, mostly."""
    local = {(f.domain, f.name) for f in model.functions.values()}
    unknown = set()
    for node in model.graph:  # onnx_ir spells the ONNX domain "" (never "ai.onnx")
        key = (node.domain, node.op_type)
        if key not in local and not onnx.defs.has(node.op_type, node.domain):
            unknown.add(node.op_type if not node.domain else f"{node.domain}.{node.op_type}")
    return sorted(unknown)


def _has_subgraph(node: ir.Node) -> bool:
    return any(a.type in (GRAPH, GRAPHS) for a in node.attributes.values())


def _subgraphs(node: ir.Node) -> Iterator[ir.Graph]:
    for attribute in node.attributes.values():
        if attribute.type == GRAPH:
            yield attribute.as_graph()
        elif attribute.type == GRAPHS:
            yield from attribute.as_graphs()


def _outer_reads(sub: ir.Graph) -> list[ir.Value]:
    """Values a subgraph (or one nested in it) reads from enclosing scopes."""
    scopes = {sub, *sub.subgraphs()}
    reads = (v for node in sub.all_nodes() for v in node.inputs if v is not None)
    return list(dict.fromkeys(v for v in reads if v.graph not in scopes))


def _readers(value: ir.Value, graph: ir.Graph) -> list[ir.Node]:
    """The nodes of `graph` itself (not of its subgraphs) that read `value`."""
    return [node for node in irs.readers(value) if node.graph is graph]


def _shape(tensor: ir.TensorProtocol) -> ir.Shape:
    return ir.Shape(tensor.shape.numpy())


def _read_later(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    """An external tensor that is read into memory when written: a proto then holds it inline,
    and a file written from the model no longer points into the input's data file."""
    return ir.LazyTensor(
        lambda: ir.Tensor(irs.read(tensor), dtype=tensor.dtype, name=tensor.name),
        dtype=tensor.dtype,
        shape=_shape(tensor),
        name=tensor.name,
    )


class _Converter:
    """Decides each float node's precision (`classify`), then edits the IR model in place to
    match (`rewrite`); `finish` gives the report once the converted weights are written."""

    def __init__(self, model: ir.Model, dtype: str, keep_io_types: bool) -> None:
        self.model = model
        self.graph = model.graph
        self.dtype = dtype
        self.low = LOW_TYPES[dtype]
        self.keep_io_types = keep_io_types
        self.report = ConversionReport(dtype)
        self.precision: dict[ir.Node, str] = {}  # "fp32" | "low" (float nodes only)
        self.seeds: set[ir.Node] = set()  # kept in fp32 for what they are, not by contagion
        self._clamped: dict[int, int] = {}  # converted tensor -> values clamped (once written)
        self._tensor_ids = itertools.count()

    # -- facts -----------------------------------------------------------------------------------

    def is_float(self, value: ir.Value | None) -> bool:
        """Whether `value` is an fp32 tensor in the model as given (types are only changed once
        every rule has read them)."""
        if value is None:
            return False
        constant = irs.tensor(value)
        if constant is not None:
            return constant.dtype == FP32
        return isinstance(value.type, ir.TensorType) and value.dtype == FP32

    def _node_is_float(self, node: ir.Node) -> bool:
        return any(self.is_float(v) for v in [*node.inputs, *node.outputs])

    # -- classification ------------------------------------------------------------------------

    def classify(self) -> None:
        for index, node in enumerate(self.graph):
            if node.op_type in _SKIP or not self._node_is_float(node):
                continue
            if node.outputs and not irs.elem_type(node.outputs[0]):
                missing, unknown = node.outputs[0].name, _unknown_ops(self.model)
                why = (
                    f": onnx's shape inference does not type what its unknown ops "
                    f"({', '.join(unknown)}) compute, so the model must carry value_info for "
                    "them, as onnxruntime-genai's builder writes"
                    if unknown
                    else ""
                )
                raise GraphfuseError(
                    f"cannot convert: shape inference left {missing!r} (output of "
                    f"{_node_name(node, index)}) untyped{why}"
                )
            inputs = node.inputs
            square = node.op_type == "Mul" and len(inputs) == 2 and inputs[0] is inputs[1]
            if (
                node.op_type in KEEP_FP32_OPS
                or square  # x * x overflows like Pow(x, 2)
                or (node.domain not in _STANDARD and not _runs_low(node))
                or _has_subgraph(node)
            ):
                self.seeds.add(node)
            joins = node in self.seeds or self._joins_island(node)
            self.precision[node] = "fp32" if joins else "low"
        for node in self.graph:  # Casts after their readers are known
            if node.op_type != "Cast" or not self._node_is_float(node):
                continue
            out = node.outputs[0]
            if not self.is_float(out):
                continue  # Cast(float -> int/bool): reads either precision, no change
            readers = _readers(out, self.graph)
            all_fp32 = bool(readers) and all(self.precision.get(r) == "fp32" for r in readers)
            keep = all_fp32 and not (out.is_graph_output() and not self.keep_io_types)
            self.precision[node] = "fp32" if keep else "low"
        self._check_subgraph_reads()

    def _joins_island(self, node: ir.Node) -> bool:
        """Elementwise node fed by an fp32 island and otherwise by constants or the island input."""
        if node.op_type not in _ISLAND_OPS:
            return False
        float_inputs = [v for v in node.inputs if self.is_float(v)]
        from_island = [v for v in float_inputs if self._produced_in_fp32(v)]
        if not from_island:
            return False
        return all(
            v in from_island or irs.is_constant(v) or self._feeds_fp32_seed(v) for v in float_inputs
        )

    def _produced_in_fp32(self, value: ir.Value | None) -> bool:
        node = irs.producer(value)
        return node is not None and self.precision.get(node) == "fp32"

    def _feeds_fp32_seed(self, value: ir.Value | None) -> bool:
        return value is not None and any(r in self.seeds for r in _readers(value, self.graph))

    def _check_subgraph_reads(self) -> None:
        for index, node in enumerate(self.graph):
            for sub in _subgraphs(node):
                for value in _outer_reads(sub):
                    if self.is_float(value) and self._new_type(value) != FP32:
                        raise GraphfuseError(
                            f"cannot convert: subgraph of {_node_name(node, index)} reads "
                            f"{value.name!r}, which would become {self.dtype}; control flow "
                            "over converted tensors is not supported"
                        )

    # -- types after conversion ----------------------------------------------------------------

    def _new_type(self, value: ir.Value) -> ir.DataType:
        """The element type of float tensor `value` after conversion (constants excluded: those
        read in both types get a low copy, see `_low_constants`)."""
        node = value.producer()
        if node is None:
            io_type = FP32 if self.keep_io_types else self.low
            return io_type if value.is_graph_input() else FP32
        return self.low if self.precision.get(node) == "low" else FP32

    # -- rewriting -----------------------------------------------------------------------------

    def rewrite(self) -> None:
        """Insert the Casts and convert the constants, then retype: every rule above reads the
        types of the model as given, so types change last."""
        nodes = list(self.graph)  # before anything is inserted: report names use positions
        wanted = {n: self.low if p == "low" else FP32 for n, p in self.precision.items()}
        low_constants = self._low_constants(wanted)
        casts: dict[tuple[ir.Value, ir.DataType], ir.Value] = {}

        def cast_to(value: ir.Value, to: ir.DataType, reader: ir.Node) -> ir.Value:
            # Inserted right before its first reader, hence after the producer: order holds.
            if (value, to) not in casts:
                suffix = "fp32" if to == FP32 else self.dtype
                cast = self._cast(
                    value, to, f"{value.name}/to_{suffix}", f"{value.name}/Cast_to_{suffix}"
                )
                self.graph.insert_before(reader, cast)
                casts[value, to] = cast.outputs[0]
            return casts[value, to]

        for index, node in enumerate(nodes):
            if node not in wanted:
                continue
            target = wanted[node]
            if node.op_type == "Cast":
                node.attributes["to"] = ir.AttrInt64("to", target)
            else:
                for position, value in enumerate(node.inputs):
                    if value is None or not self.is_float(value):
                        continue
                    if irs.is_constant(value):
                        if target == self.low:
                            node.replace_input_with(position, low_constants[value])
                    elif self._new_type(value) != target:
                        node.replace_input_with(position, cast_to(value, target, node))
                if node.op_type == "ConstantOfShape" and target == self.low:
                    self._convert_value_attribute(node, default=np.zeros(1, np.float32))
            if target == self.low:
                self.report.low_nodes += 1
            else:
                self.report.fp32_nodes.append(_node_name(node, index))

        self._fix_graph_outputs()
        for value, low_value in low_constants.items():
            if low_value is value:
                self._convert_in_place(value)
        self._fix_graph_inputs()
        for node, target in wanted.items():  # the float outputs take their node's precision
            for out in node.outputs:
                if self.is_float(out):
                    out.dtype = target

    def _low_constants(self, wanted: Mapping[ir.Node, ir.DataType]) -> dict[ir.Value, ir.Value]:
        """Each float constant read in the low type -> what its low readers read: the constant
        itself, to be converted in place, or a low copy beside it when fp32 readers remain
        (shared, de-duplicated initializers). A graph output or a subgraph's read counts as an
        fp32 reader: neither changes type."""
        needs: dict[ir.Value, set[ir.DataType]] = defaultdict(set)
        for node, target in wanted.items():
            if node.op_type == "Cast":
                continue  # a Cast reads either type
            for value in node.inputs:
                if value is not None and irs.is_constant(value) and self.is_float(value):
                    needs[value].add(target)
        low: dict[ir.Value, ir.Value] = {}
        for value, types in needs.items():
            if self.low not in types:
                continue
            elsewhere = value.is_graph_output() or any(
                use.node.graph is not self.graph for use in value.uses()
            )
            low[value] = self._low_copy(value) if FP32 in types or elsewhere else value
        return low

    def _low_copy(self, value: ir.Value) -> ir.Value:
        name = f"{value.name}_{self.dtype}"
        tensor = irs.tensor(value)
        assert tensor is not None
        if value.is_initializer():
            copy = ir.val(name, self.low, _shape(tensor), const_value=self._to_low(tensor, name))
            self.graph.register_initializer(copy)
            self.report.initializers_converted += 1
            return copy
        node = value.producer()  # a Constant node
        assert node is not None
        constant = ir.node(
            "Constant",
            [],
            {"value": self._to_low(tensor, name)},
            name=f"{node.name or value.name}_{self.dtype}",
            doc_string=_PROVENANCE,
        )
        out = constant.outputs[0]
        out.name, out.dtype, out.shape = name, self.low, _shape(tensor)
        self.graph.insert_after(node, constant)
        return out

    def _convert_in_place(self, value: ir.Value) -> None:
        tensor = irs.tensor(value)
        assert tensor is not None
        if value.is_initializer():
            value.const_value = self._to_low(tensor, value.name or "")
            self.report.initializers_converted += 1
        else:  # a Constant node, whichever attribute held its value
            node = value.producer()
            assert node is not None
            node.attributes.clear()
            node.attributes["value"] = ir.AttrTensor("value", self._to_low(tensor, tensor.name))
        value.dtype = self.low

    def _convert_value_attribute(self, node: ir.Node, default: np.ndarray) -> None:
        tensor = node.attributes.get_tensor("value")
        if tensor is None:
            tensor = ir.tensor(default)
        if tensor.dtype == FP32:
            node.attributes["value"] = ir.AttrTensor("value", self._to_low(tensor, tensor.name))

    def _to_low(self, tensor: ir.TensorProtocol, name: str | None) -> ir.LazyTensor:
        """`tensor` in the low type, computed when the model is written (or read), so that the
        fp32 and low copies of the weights are not all held at once."""
        key = next(self._tensor_ids)

        def convert() -> ir.Tensor:
            values = np.asarray(irs.read(tensor), dtype=np.float32)
            if self.dtype == "fp16":
                too_big = (np.abs(values) > _FP16_MAX) & np.isfinite(values)
                self._clamped[key] = int(np.count_nonzero(too_big))
                values = np.where(too_big, np.sign(values) * _FP16_MAX, values)
            return ir.Tensor(values.astype(_NUMPY_LOW[self.dtype]), dtype=self.low, name=name)

        return ir.LazyTensor(convert, dtype=self.low, shape=_shape(tensor), name=name)

    def _cast(self, value: ir.Value, to: ir.DataType, name: str, node_name: str) -> ir.Node:
        cast = ir.node("Cast", [value], {"to": to}, name=node_name, doc_string=_PROVENANCE)
        out = cast.outputs[0]
        out.name, out.dtype, out.shape = name, to, value.shape
        self.report.casts_inserted += 1
        return cast

    def _fix_graph_outputs(self) -> None:
        wanted = FP32 if self.keep_io_types else self.low
        outputs = self.graph.outputs
        restored: dict[ir.Value, ir.Value] = {}  # a value listed twice gets one Cast
        for position, output in enumerate(outputs):
            if output in restored:
                outputs[position] = restored[output]
                continue
            if not self.is_float(output) or output.producer() is None or irs.is_constant(output):
                continue  # a graph input or a constant passed through: untouched
            produced = self._new_type(output)
            if produced == wanted:
                continue  # retyped with its producer
            # The producer's output gets a new name; a Cast restores the graph output's name.
            name = output.name
            output.name = f"{name}/{'fp32' if produced == FP32 else self.dtype}"
            cast = self._cast(output, wanted, name or "", f"{name}/Cast_out")
            self.graph.append(cast)
            outputs[position] = restored[output] = cast.outputs[0]

    def _fix_graph_inputs(self) -> None:
        if self.keep_io_types:
            return
        for value in self.graph.inputs:
            if isinstance(value.type, ir.TensorType) and value.dtype == FP32:
                if value.const_value is not None:  # an initializer's default goes with its type
                    value.const_value = self._to_low(value.const_value, value.name)
                    self.report.initializers_converted += 1
                value.dtype = self.low

    def finish(self) -> ConversionReport:
        """The report, once the model is written (converted weights count their clamps then)."""
        self.report.values_clamped = sum(self._clamped.values())
        return self.report


def _load(model: onnx.ModelProto | str | Path) -> ir.Model:
    """`model` as an IR model: a proto is wrapped (never modified), a file's external weights
    are read when needed, one at a time."""
    if isinstance(model, onnx.ModelProto):
        return irs.from_proto(model)
    from graphfuse import genai, onnx_io

    path = genai.model_file(model) if genai.is_folder(model) else Path(model)
    if not path.is_file():
        raise GraphfuseError(f"ONNX file not found: {path}")
    return irs.from_proto(onnx_io.load(path), path.parent)


def _convert(
    model: onnx.ModelProto | str | Path, dtype: str, keep_io_types: bool
) -> tuple[ir.Model, _Converter, list[str]]:
    """The converted IR model (its weights converted when written), the converter (whose
    `finish` gives the report) and the ops onnx does not know (for `_check`)."""
    if dtype not in LOW_TYPES:
        raise GraphfuseError(f"unknown dtype {dtype!r}: use 'fp16' or 'bf16'")
    m = _load(model)
    opset = next((v for d, v in m.opset_imports.items() if d in _STANDARD), 0)
    if dtype == "bf16" and opset < 13:
        raise GraphfuseError(f"bf16 needs opset >= 13 (Cast to bfloat16); the model has {opset}")
    unknown = _unknown_ops(m)
    if dtype == "bf16" and unknown:
        raise GraphfuseError(
            f"bf16 needs ops onnx knows, but the model has {', '.join(unknown)}; ONNX Runtime's "
            "CPU kernels run no bf16 MatMul or GroupQueryAttention, so nothing here could run "
            "or check the result: use fp16"
        )
    # Types: what the model declares (value_info: how ONNX Runtime's ops, unknown to onnx, are
    # typed) and what onnx's shape inference adds; `classify` refuses a float node left untyped.
    irs.infer_types(m)
    converter = _Converter(m, dtype, keep_io_types)
    converter.classify()
    converter.rewrite()
    for graph in m.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                value.const_value = _read_later(value.const_value)
    return m, converter, unknown


def convert_precision(
    model: onnx.ModelProto | str | Path, dtype: str = "fp16", *, keep_io_types: bool = True
) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert an fp32 model's float computation and weights to `dtype` ("fp16" or "bf16").

    Norms and reductions stay in fp32 islands (see the module docstring). With `keep_io_types`
    the graph inputs and outputs stay fp32 (Casts at the edges), so the same feeds work.
    `model` may be an onnxruntime-genai folder: its model is converted (`convert_folder` writes
    a whole folder). Returns the converted model (a copy, weights inline) and a report.
    """
    converted, converter, unknown = _convert(model, dtype, keep_io_types)
    proto = irs.to_proto(converted)  # converts the weights, one at a time
    if proto.ByteSize() < 2**31 - 1:  # a bigger one cannot be serialised to check in memory
        _check(proto, unknown)
    return proto, converter.finish()


def _check(model: onnx.ModelProto | Path, unknown: list[str]) -> None:
    """The post-condition: onnx's checker and strict shape inference, or, where the model has
    ops they do not know, an ONNX Runtime session (schemas and kernels of ONNX Runtime's ops).
    `model` in memory, or its file (a folder's model, written straight from the IR)."""
    if not unknown:
        try:
            if isinstance(model, Path):
                onnx.checker.check_model(str(model))
                onnx.shape_inference.infer_shapes_path(str(model), os.devnull, strict_mode=True)
            else:
                onnx.checker.check_model(model)
                onnx.shape_inference.infer_shapes(model, strict_mode=True)
        except Exception as exc:
            raise GraphfuseError(f"the converted model does not check: {exc}") from None
        return
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    try:
        ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphfuseError(
            f"the converted model does not load in ONNX Runtime (which checks it, as onnx's "
            f"checker does not know {', '.join(unknown)}): {first}"
        ) from None


def convert(
    model: onnx.ModelProto | str | Path, dtype: str = "fp16", *, keep_io_types: bool = True
) -> onnx.ModelProto:
    """`convert_precision` without the report."""
    return convert_precision(model, dtype, keep_io_types=keep_io_types)[0]


def convert_folder(
    source: str | os.PathLike, output: str | os.PathLike, dtype: str = "fp16"
) -> ConversionReport:
    """Convert the model of an onnxruntime-genai folder into a new, complete folder `output`.

    The graph inputs and outputs take the low type too, as in the builder's own fp16 models:
    the KV cache (past_key_values.* in, present.* out, read and written by GroupQueryAttention in
    fp16) and the logits. onnxruntime-genai reads those types from the model, so
    genai_config.json is copied unchanged. bf16 is refused: onnxruntime-genai runs the folder in
    ONNX Runtime, whose CPU kernels have no bf16 MatMul or GroupQueryAttention.
    """
    from graphfuse import genai, onnx_io

    if dtype == "bf16":
        raise GraphfuseError(
            "bf16 of an onnxruntime-genai folder: ONNX Runtime's CPU kernels, which run it, "
            "have no bf16 MatMul or GroupQueryAttention; use fp16"
        )

    def write(model_in: Path, model_out: Path) -> ConversionReport:
        # Straight from the IR to the file: each weight is read, converted and written in turn.
        converted, converter, unknown = _convert(model_in, dtype, keep_io_types=False)
        onnx_io.save(converted, model_out)
        _check(model_out, unknown)
        return converter.finish()

    return genai.transform_folder(Path(source), Path(output), write)


# ----------------------------------------------------------------------------------------------
# Accuracy of a conversion
# ----------------------------------------------------------------------------------------------


def _uses_bf16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    if any(t.data_type == TensorProto.BFLOAT16 for t in graph.initializer):
        return True
    if any(i.type.tensor_type.elem_type == TensorProto.BFLOAT16 for i in graph.input):
        return True  # bf16 graph inputs (keep_io_types=False), perhaps with no bf16 weight
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.name == "to" and attribute.i == TensorProto.BFLOAT16:
                return True
    return False


def run_model(
    model: onnx.ModelProto | str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    runtime: str = "auto",
) -> list[np.ndarray]:
    """Outputs of `model` on `feeds` (float feeds are cast to the model's input types).

    runtime: "onnxruntime" (CPU, graph optimisations off), "reference" (the ONNX reference
    evaluator: true fp16/bf16 arithmetic, slow) or "auto" (ONNX Runtime, or the reference
    evaluator for bf16, which ONNX Runtime's CPU kernels lack). Note that ONNX Runtime's CPU
    provider runs fp16 nodes it has no fp16 kernel for (Pow, ReduceMean, ...) in fp32 behind
    inserted Casts, so it understates fp16 overflow that a GPU would show.
    """
    if runtime not in ("auto", "onnxruntime", "reference"):
        raise GraphfuseError(f"unknown runtime {runtime!r}: use auto, onnxruntime or reference")
    # A file's weights are left to the runtime, which reads them itself.
    proto = (
        model
        if isinstance(model, onnx.ModelProto)
        else onnx.load(str(model), load_external_data=False)
    )
    inputs = {i.name: i.type.tensor_type.elem_type for i in proto.graph.input}
    cast_feeds = {}
    for name, value in feeds.items():
        target = inputs.get(name)
        if target == TensorProto.FLOAT16:
            value = np.asarray(value, dtype=np.float16)
        elif target == TensorProto.BFLOAT16:
            value = np.asarray(value, dtype=np.float32).astype(ml_dtypes.bfloat16)
        cast_feeds[name] = value
    if runtime == "reference" or (runtime == "auto" and _uses_bf16(proto)):
        from onnx.reference import ReferenceEvaluator

        full = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
        return list(ReferenceEvaluator(full).run(None, cast_feeds))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    source = proto.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return list(session.run(None, cast_feeds))


def conversion_error(
    fp32_model: onnx.ModelProto | str | Path,
    converted_model: onnx.ModelProto | str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    runtime: str = "auto",
) -> float:
    """Largest relative difference of the outputs: max over outputs of max|a - b| / max|a|.

    Normalising by each output's largest magnitude (not element by element) keeps values near
    zero from dominating; a non-finite converted output gives inf. `runtime` as in `run_model`
    ("reference" for true low-precision arithmetic); the fp32 model always runs in ONNX Runtime.
    """
    reference = run_model(fp32_model, feeds, runtime="onnxruntime")
    converted = run_model(converted_model, feeds, runtime=runtime)
    if len(reference) != len(converted):
        raise GraphfuseError(
            f"the models have different outputs ({len(reference)} vs {len(converted)})"
        )
    worst = 0.0
    for a, b in zip(reference, converted, strict=True):
        a64 = np.asarray(a, dtype=np.float64)
        b64 = np.asarray(b, dtype=np.float32).astype(np.float64)
        if a64.shape != b64.shape:
            raise GraphfuseError(f"output shapes differ: {a64.shape} vs {b64.shape}")
        if a64.size == 0:
            continue
        if not np.all(np.isfinite(b64)):
            return float("inf")
        scale = float(np.max(np.abs(a64))) or 1.0
        worst = max(worst, float(np.max(np.abs(a64 - b64))) / scale)
    return worst


__all__ = [
    "KEEP_FP32_OPS",
    "ConversionReport",
    "conversion_error",
    "convert",
    "convert_folder",
    "convert_precision",
    "run_model",
]
