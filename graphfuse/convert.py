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
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from graphfuse.errors import GraphfuseError

LOW_TYPES = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
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


def _node_name(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index} ({node.op_type})"


def _runs_low(node: onnx.NodeProto) -> bool:
    """An ONNX Runtime op that computes in the low type (see `LOW_CONTRIB_OPS`)."""
    fixed = LOW_CONTRIB_OPS.get((node.domain, node.op_type))
    return fixed is not None and not any(i < len(node.input) and node.input[i] for i in fixed)


def _unknown_ops(model: onnx.ModelProto) -> list[str]:
    """Ops that onnx's checker and shape inference do not know: ONNX Runtime's own, mostly."""
    local = {(f.domain, f.name) for f in model.functions}
    unknown = set()
    for node in model.graph.node:
        domain = "" if node.domain == "ai.onnx" else node.domain
        if (domain, node.op_type) not in local and not onnx.defs.has(node.op_type, domain):
            unknown.add(node.op_type if not domain else f"{domain}.{node.op_type}")
    return sorted(unknown)


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    )


def _outer_names(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    local = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    outer: set[str] = set()
    for node in graph.node:
        outer.update(n for n in node.input if n and n not in local)
        for attribute in node.attribute:
            subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
            for sub in [*subs, *attribute.graphs]:
                outer.update(n for n in _outer_names(sub) if n not in local)
        local.update(node.output)
    return outer


class _Converter:
    def __init__(self, model: onnx.ModelProto, dtype: str, keep_io_types: bool) -> None:
        self.model = model
        self.graph = model.graph
        self.dtype = dtype
        self.low = LOW_TYPES[dtype]
        self.keep_io_types = keep_io_types
        self.report = ConversionReport(dtype)
        self.types = self._tensor_types()
        self.constants = {t.name for t in self.graph.initializer}
        self.producer: dict[str, int] = {}
        self.consumers: dict[str, list[int]] = defaultdict(list)
        for index, node in enumerate(self.graph.node):
            for name in node.output:
                if name:
                    self.producer[name] = index
            for name in node.input:
                if name:
                    self.consumers[name].append(index)
            if node.op_type == "Constant" and node.domain in _STANDARD:
                self.constants.update(n for n in node.output if n)
        self.precision: dict[int, str] = {}  # node index -> "fp32" | "low" (float nodes only)
        self.seeds: set[int] = set()  # nodes kept in fp32 for what they are, not by contagion

    # -- facts -----------------------------------------------------------------------------------

    def _tensor_types(self) -> dict[str, int]:
        try:
            inferred = onnx.shape_inference.infer_shapes(self.model)
        except Exception as exc:
            raise GraphfuseError(
                f"shape inference failed, so tensor types are unknown: {exc}"
            ) from None
        types: dict[str, int] = {}
        graph = inferred.graph
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type"):
                types[info.name] = info.type.tensor_type.elem_type
        for init in graph.initializer:
            types[init.name] = init.data_type
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in _STANDARD:
                value = next((a.t for a in node.attribute if a.name == "value"), None)
                if value is not None:
                    types[node.output[0]] = value.data_type
        return types

    def is_float(self, name: str) -> bool:
        return self.types.get(name) == TensorProto.FLOAT

    def _node_is_float(self, node: onnx.NodeProto) -> bool:
        return any(self.is_float(n) for n in [*node.input, *node.output] if n)

    # -- classification ------------------------------------------------------------------------

    def classify(self) -> None:
        nodes = self.graph.node
        for index, node in enumerate(nodes):
            if node.op_type in _SKIP or not self._node_is_float(node):
                continue
            if self.types.get(node.output[0] if node.output else "", 0) == 0 and node.output:
                missing, unknown = node.output[0], _unknown_ops(self.model)
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
            square = (
                node.op_type == "Mul" and len(node.input) == 2 and node.input[0] == node.input[1]
            )
            if (
                node.op_type in KEEP_FP32_OPS
                or square  # x * x overflows like Pow(x, 2)
                or (node.domain not in _STANDARD and not _runs_low(node))
                or _has_subgraph(node)
            ):
                self.seeds.add(index)
            joins = index in self.seeds or self._joins_island(node)
            self.precision[index] = "fp32" if joins else "low"
        for index, node in enumerate(nodes):  # Casts after their consumers are known
            if node.op_type != "Cast" or not self._node_is_float(node):
                continue
            if not self.is_float(node.output[0]):
                continue  # Cast(float -> int/bool): reads either precision, no change
            users = self.consumers.get(node.output[0], [])
            is_output = node.output[0] in {o.name for o in self.graph.output}
            all_fp32 = bool(users) and all(self.precision.get(u) == "fp32" for u in users)
            keep = all_fp32 and not (is_output and not self.keep_io_types)
            self.precision[index] = "fp32" if keep else "low"
        self._check_subgraph_reads()

    def _joins_island(self, node: onnx.NodeProto) -> bool:
        """Elementwise node fed by an fp32 island and otherwise by constants or the island input."""
        if node.op_type not in _ISLAND_OPS:
            return False
        float_inputs = [n for n in node.input if n and self.is_float(n)]
        from_island = [n for n in float_inputs if self._produced_in_fp32(n)]
        if not from_island:
            return False
        return all(
            n in from_island or n in self.constants or self._feeds_fp32_seed(n)
            for n in float_inputs
        )

    def _produced_in_fp32(self, name: str) -> bool:
        index = self.producer.get(name)
        return index is not None and self.precision.get(index) == "fp32"

    def _feeds_fp32_seed(self, name: str) -> bool:
        return any(u in self.seeds for u in self.consumers.get(name, []))

    def _check_subgraph_reads(self) -> None:
        for index, node in enumerate(self.graph.node):
            if not _has_subgraph(node):
                continue
            for attribute in node.attribute:
                subs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
                for sub in [*subs, *attribute.graphs]:
                    for name in _outer_names(sub):
                        if self.is_float(name) and self._new_type(name) != TensorProto.FLOAT:
                            raise GraphfuseError(
                                f"cannot convert: subgraph of {_node_name(node, index)} reads "
                                f"{name!r}, which would become {self.dtype}; control flow over "
                                "converted tensors is not supported"
                            )

    # -- types after conversion ----------------------------------------------------------------

    def _new_type(self, name: str) -> int:
        """The element type of float tensor `name` after conversion (constants excluded)."""
        index = self.producer.get(name)
        if index is None:  # graph input
            return TensorProto.FLOAT if self.keep_io_types else self.low
        return self.low if self.precision.get(index) == "low" else TensorProto.FLOAT

    # -- rewriting -----------------------------------------------------------------------------

    def rewrite(self) -> None:
        graph = self.graph
        wanted = {
            i: self.low if p == "low" else TensorProto.FLOAT for i, p in self.precision.items()
        }
        # Float constants read in the low type: converted in place, or duplicated when fp32
        # readers remain (shared, de-duplicated initializers).
        needs: dict[str, set[int]] = defaultdict(set)
        for index, node in enumerate(graph.node):
            if index in wanted and node.op_type != "Cast":
                for name in node.input:
                    if name in self.constants and self.is_float(name):
                        needs[name].add(wanted[index])
        low_name = {
            name: name if TensorProto.FLOAT not in types else f"{name}_{self.dtype}"
            for name, types in needs.items()
            if self.low in types
        }
        new_nodes: list[onnx.NodeProto] = []
        for name, converted in low_name.items():
            self._convert_constant(name, converted, new_nodes)

        casts: dict[tuple[str, int], str] = {}

        def cast_to(name: str, to: int) -> str:
            # Appended right before its first reader, hence after the producer: order holds.
            if (name, to) not in casts:
                suffix = "fp32" if to == TensorProto.FLOAT else self.dtype
                casts[name, to] = f"{name}/to_{suffix}"
                new_nodes.append(
                    helper.make_node(
                        "Cast", [name], [casts[name, to]], name=f"{name}/Cast_to_{suffix}",
                        to=to, doc_string=_PROVENANCE,
                    )
                )  # fmt: skip
                self.report.casts_inserted += 1
            return casts[name, to]

        for index, node in enumerate(graph.node):
            if index not in wanted:
                new_nodes.append(node)
                continue
            target = wanted[index]
            if node.op_type == "Cast":
                for attribute in node.attribute:
                    if attribute.name == "to":
                        attribute.i = target
            else:
                for position, name in enumerate(node.input):
                    if not name or not self.is_float(name):
                        continue
                    if name in self.constants:
                        if target == self.low:
                            node.input[position] = low_name[name]
                    elif self._new_type(name) != target:
                        node.input[position] = cast_to(name, target)
                if node.op_type == "ConstantOfShape" and target == self.low:
                    self._convert_attribute(node, "value")
            if target == self.low:
                self.report.low_nodes += 1
            else:
                self.report.fp32_nodes.append(_node_name(node, index))
            new_nodes.append(node)

        self._fix_graph_outputs(new_nodes)
        del graph.node[:]
        graph.node.extend(new_nodes)
        self._fix_graph_inputs()
        del graph.value_info[:]  # stale types; shape inference recomputes them

    def _convert_constant(self, name: str, low_name: str, new_nodes: list[onnx.NodeProto]) -> None:
        initializers = {t.name: t for t in self.graph.initializer}
        if name in initializers:
            low = self._to_low(initializers[name], low_name)
            if low_name == name:
                initializers[name].CopyFrom(low)
            else:
                self.graph.initializer.append(low)
            self.report.initializers_converted += 1
            return
        node = self.graph.node[self.producer[name]]  # a Constant node
        if low_name == name:
            self._convert_attribute(node, "value")
            return
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name or name}_{self.dtype}"
        copy.output[0] = low_name
        copy.doc_string = _PROVENANCE
        self._convert_attribute(copy, "value")
        new_nodes.append(copy)

    def _convert_attribute(self, node: onnx.NodeProto, attribute_name: str) -> None:
        for attribute in node.attribute:
            if attribute.name == attribute_name and attribute.t.data_type == TensorProto.FLOAT:
                attribute.t.CopyFrom(self._to_low(attribute.t, attribute.t.name))

    def _to_low(self, tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
        values = numpy_helper.to_array(tensor).astype(np.float32)
        if self.dtype == "fp16":
            too_big = (np.abs(values) > _FP16_MAX) & np.isfinite(values)
            self.report.values_clamped += int(np.count_nonzero(too_big))
            values = np.where(too_big, np.sign(values) * _FP16_MAX, values)
        return numpy_helper.from_array(values.astype(_NUMPY_LOW[self.dtype]), name)

    def _fix_graph_outputs(self, new_nodes: list[onnx.NodeProto]) -> None:
        wanted = TensorProto.FLOAT if self.keep_io_types else self.low
        for output in self.graph.output:
            name = output.name
            if not self.is_float(name) or name in self.constants or name not in self.producer:
                continue  # a graph input or a constant passed through: untouched
            produced = self._new_type(name)
            if produced == wanted:
                output.type.tensor_type.elem_type = wanted
                continue
            # The producer's output gets a new name; a Cast restores the graph output's name.
            inner = f"{name}/{'fp32' if produced == TensorProto.FLOAT else self.dtype}"
            for node in new_nodes:
                node.output[:] = [inner if n == name else n for n in node.output]
                node.input[:] = [inner if n == name else n for n in node.input]
            new_nodes.append(
                helper.make_node(
                    "Cast", [inner], [name], name=f"{name}/Cast_out", to=wanted,
                    doc_string=_PROVENANCE,
                )
            )  # fmt: skip
            self.report.casts_inserted += 1
            output.type.tensor_type.elem_type = wanted

    def _fix_graph_inputs(self) -> None:
        if self.keep_io_types:
            return
        for info in self.graph.input:
            if info.type.tensor_type.elem_type == TensorProto.FLOAT:
                info.type.tensor_type.elem_type = self.low


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        return copy
    from graphfuse import genai

    path = genai.model_file(model) if genai.is_folder(model) else Path(model)
    if not path.is_file():
        raise GraphfuseError(f"ONNX file not found: {path}")
    return onnx.load(str(path))


def convert_precision(
    model: onnx.ModelProto | str | Path, dtype: str = "fp16", *, keep_io_types: bool = True
) -> tuple[onnx.ModelProto, ConversionReport]:
    """Convert an fp32 model's float computation and weights to `dtype` ("fp16" or "bf16").

    Norms and reductions stay in fp32 islands (see the module docstring). With `keep_io_types`
    the graph inputs and outputs stay fp32 (Casts at the edges), so the same feeds work.
    `model` may be an onnxruntime-genai folder: its model is converted (`convert_folder` writes
    a whole folder). Returns the converted model (a copy) and a report.
    """
    if dtype not in LOW_TYPES:
        raise GraphfuseError(f"unknown dtype {dtype!r}: use 'fp16' or 'bf16'")
    proto = _load(model)
    opset = next((o.version for o in proto.opset_import if o.domain in _STANDARD), 0)
    if dtype == "bf16" and opset < 13:
        raise GraphfuseError(f"bf16 needs opset >= 13 (Cast to bfloat16); the model has {opset}")
    unknown = _unknown_ops(proto)
    if dtype == "bf16" and unknown:
        raise GraphfuseError(
            f"bf16 needs ops onnx knows, but the model has {', '.join(unknown)}; ONNX Runtime's "
            "CPU kernels run no bf16 MatMul or GroupQueryAttention, so nothing here could run "
            "or check the result: use fp16"
        )
    converter = _Converter(proto, dtype, keep_io_types)
    converter.classify()
    converter.rewrite()
    if proto.ByteSize() < 2**31 - 1:  # a bigger one cannot be serialised to check in memory
        _check(proto, unknown)
    return proto, converter.report


def _check(model: onnx.ModelProto | Path, unknown: list[str]) -> None:
    """The post-condition: onnx's checker and strict shape inference, or, where the model has
    ops they do not know, an ONNX Runtime session (schemas and kernels of ONNX Runtime's ops).
    `model` in memory, or its file when it is too big to serialise (over 2 GB)."""
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
        converted, report = convert_precision(model_in, dtype, keep_io_types=False)
        onnx_io.save(converted, model_out)
        if converted.ByteSize() >= 2**31 - 1:  # too big to check in memory: check the file
            _check(model_out, _unknown_ops(converted))
        return report

    return genai.transform_folder(Path(source), Path(output), write)


# ----------------------------------------------------------------------------------------------
# Accuracy of a conversion
# ----------------------------------------------------------------------------------------------


def _uses_bf16(model: onnx.ModelProto) -> bool:
    graph = model.graph
    if any(t.data_type == TensorProto.BFLOAT16 for t in graph.initializer):
        return True
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
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
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

        return list(ReferenceEvaluator(proto).run(None, cast_feeds))
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
