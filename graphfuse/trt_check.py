"""Static check: which nodes of an ONNX model TensorRT's ONNX parser (10.x / 11.x) cannot take.

No TensorRT needed. The facts come from onnx-tensorrt's docs/operators.md for TensorRT 10.15
(operator matrix, supported types, restrictions) plus the parser changes announced in the
TensorRT 10.14-11.5 release notes (Attention in 10.14; Swish in 11.0; DFT and 5-D GridSample in
11.2; opset 25 and Squeeze without axes in 11.5) and the onnx-tensorrt FAQ (ops outside the table
or the standard domain import only as registered TensorRT plugins).

    check_tensorrt(model, version="10") -> [Finding(op, node, reason, severity), ...]

Checked: op support and the listed data types of each node (subgraphs and model-local functions
included), the model's opset against the parser's range, non-standard domains, DOUBLE tensors
(cast down to FLOAT), and the restrictions the matrix states (constant `axes`, `If` branch
outputs, `Loop` scan outputs, Attention/TopK/Resize/... attributes). What the docs do not say
is not guessed at: a model with no findings can still fail to build.

The model is read as onnx_ir (types and shapes inferred; an outer value is the same object in a
subgraph); weights in an external data file stay on disk, only small constants are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphfuse.errors import GraphfuseError
from graphfuse.ir import attr, from_proto, infer_types, load, read
from graphfuse.ir import tensor as irs_tensor

_T = ir.DataType
_TYPE_CODES = {
    "FP32": _T.FLOAT, "FP16": _T.FLOAT16, "BF16": _T.BFLOAT16, "INT32": _T.INT32,
    "INT64": _T.INT64, "INT8": _T.INT8, "UINT8": _T.UINT8, "BOOL": _T.BOOL,
    "FP8": _T.FLOAT8E4M3FN, "FP4": _T.FLOAT4E2M1, "INT4": _T.INT4,
}  # fmt: skip

_F = "FP32 FP16 BF16"
_FI = "FP32 FP16 BF16 INT32 INT64"
_FIB = "FP32 FP16 BF16 INT32 INT64 BOOL"
_CONST = "FP32 FP16 BF16 FP8 FP4 INT4 INT32 INT64 BOOL"

# Supported ONNX operators and their types: onnx-tensorrt docs/operators.md, TensorRT 10.15.
# Restrictions listed there are checked by the rules further down.
_SUPPORTED_10: dict[str, str] = {
    "Abs": _FI, "Acos": _F, "Acosh": _F, "Add": _FI, "And": "BOOL", "ArgMax": _FI,
    "ArgMin": _FI, "Asin": _F, "Asinh": _F, "Atan": _F, "Atanh": _F,
    "Attention": f"{_F} INT8 FP8", "AveragePool": _F, "BatchNormalization": _F,
    "BlackmanWindow": "FP32 FP16", "Cast": f"{_FI} UINT8 BOOL", "CastLike": f"{_FI} UINT8 BOOL",
    "Ceil": _F, "Celu": _F, "Clip": _F, "Concat": _FIB, "Constant": _CONST,
    "ConstantOfShape": _CONST, "Conv": _F, "ConvTranspose": _F, "Cos": _F, "Cosh": _F,
    "CumSum": _F, "DeformConv": "FP32 FP16", "DepthToSpace": _FI,
    "DequantizeLinear": "INT8 FP8 FP4 INT4", "Div": _FI, "Dropout": _F, "Einsum": _F, "Elu": _F,
    "Equal": _FI, "Erf": _F, "Exp": _F, "Expand": _FIB, "EyeLike": _FIB, "Flatten": _FIB,
    "Floor": _F, "Gather": _FIB, "GatherElements": _FIB, "GatherND": _FIB,
    "Gelu": f"{_F} INT8 INT32 INT64", "Gemm": _F, "GlobalAveragePool": _F, "GlobalLpPool": _F,
    "GlobalMaxPool": _F, "Greater": _FI, "GreaterOrEqual": _FI, "GridSample": "FP32 FP16",
    "GroupNormalization": _F, "GRU": _F, "HammingWindow": "FP32 FP16", "HannWindow": "FP32 FP16",
    "HardSigmoid": _F, "HardSwish": _F, "Hardmax": _F, "Identity": _FIB, "If": _FIB,
    "ImageScaler": _F, "InstanceNormalization": _F, "IsInf": _F, "IsNaN": _FI,
    "LayerNormalization": _F, "LeakyRelu": _F, "Less": _FI, "LessOrEqual": _FI, "Log": _F,
    "LogSoftmax": _F, "Loop": _FIB, "LRN": _F, "LSTM": _F, "LpNormalization": _F, "LpPool": _F,
    "MatMul": _F, "Max": _FI, "MaxPool": _F, "Mean": f"{_FI} FP8",
    "MeanVarianceNormalization": _F, "Min": _FI, "Mish": "FP32 FP16", "Mod": _FI, "Mul": _FI,
    "Neg": _FI, "NonMaxSuppression": "FP32 FP16", "NonZero": "FP32 FP16", "Not": "BOOL",
    "OneHot": _FIB, "Or": "BOOL", "Pad": _FI, "ParametricSoftplus": _F, "Pow": _FI, "PRelu": _F,
    "QuantizeLinear": _F, "RandomNormal": _F, "RandomNormalLike": _F, "RandomUniform": _F,
    "RandomUniformLike": _F, "Range": _FI, "Reciprocal": _F, "ReduceL1": _FI, "ReduceL2": _FI,
    "ReduceLogSum": _FI, "ReduceLogSumExp": _FI, "ReduceMax": _FI, "ReduceMean": _FI,
    "ReduceMin": _FI, "ReduceProd": _FI, "ReduceSum": _FI, "ReduceSumSquare": _FI, "Relu": _FI,
    "Reshape": _FIB, "Resize": _F, "ReverseSequence": _FIB, "RMSNormalization": _F, "RNN": _F,
    "RoiAlign": "FP32 FP16", "RotaryEmbedding": _F, "Round": _F, "STFT": "FP32",
    "ScaledTanh": _F, "Scan": _F, "Scatter": _FI, "ScatterElements": _FI, "ScatterND": _FI,
    "Selu": _F, "Shape": _FIB, "Shrink": _FI, "Sigmoid": _F, "Sign": _FI, "Sin": _F, "Sinh": _F,
    "Size": _FIB, "Slice": _FIB, "Softmax": _F, "Softplus": _F, "Softsign": _F,
    "SpaceToDepth": _FI, "Split": _FIB, "Sqrt": _F, "Squeeze": _FIB, "Sub": _FI, "Sum": _FI,
    "Tan": _F, "Tanh": _F, "TensorScatter": f"{_F} INT32", "ThresholdedRelu": _F, "Tile": _FIB,
    "TopK": _FI, "Transpose": _FIB, "Trilu": _FIB, "Unsqueeze": _FIB, "Upsample": _F,
    "Where": _FIB, "Xor": "BOOL",
}  # fmt: skip

# Listed as "N" in the same table (ops absent from it are unsupported as well).
_UNSUPPORTED_10 = frozenset({
    "AffineGrid", "Bernoulli", "BitShift", "BitwiseAnd", "BitwiseNot", "BitwiseOr", "BitwiseXor",
    "Col2Im", "CenterCropPad", "Compress", "ConcatFromSequence", "ConvInteger", "DFT", "Det",
    "DynamicQuantizeLinear", "ImageDecoder", "MatMulInteger", "MaxRoiPool", "MaxUnpool",
    "MelWeightMatrix", "Multinomial", "NegativeLogLikelihoodLoss", "Optional",
    "OptionalGetElement", "OptionalHasElement", "QLinearConv", "QLinearMatMul", "RegexFullMatch",
    "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "SequenceMap", "SoftmaxCrossEntropyLoss", "SplitToSequence", "StringConcat",
    "StringNormalizer", "StringSplit", "TfIdfVectorizer", "Unique",
})  # fmt: skip

# Parser changes after the 10.15 table, from the release notes: (version, op, types or None).
_ADDED_OPS: list[tuple[tuple[int, int], str, str | None]] = [
    ((11, 0), "Swish", None),  # types not listed in the notes: not type-checked
    ((11, 2), "DFT", None),  # through a cuFFT plugin the parser inserts
]
_ATTENTION_SINCE = (10, 14)
# TensorRT-specific ops the 11.x parser imports natively (11.0 release notes).
_TRT_CUSTOM_OPS_11 = frozenset({"TRT_Attention", "TRT_MoE", "TRT_KVCacheUpdate"})
_LATEST = {10: (10, 15), 11: (11, 5)}
_OPSET_MIN = 9


def _opset_max(version: tuple[int, int]) -> int:
    return 25 if version >= (11, 5) else 24


@dataclass(frozen=True)
class Finding:
    """One thing the parser will reject ("error") or may reject / handles lossily ("warning")."""

    op: str
    node: str
    reason: str
    severity: str = "error"


def parse_version(version: str | int) -> tuple[int, int]:
    """ "10" / "11" mean the latest documented release of that major; "10.13" pins a minor."""
    text = str(version).strip().lower().removeprefix("tensorrt").strip().rstrip(".x")
    parts = text.split(".")
    try:
        major = int(parts[0])
        minor = int(parts[1]) if len(parts) > 1 and parts[1] not in ("", "x") else None
    except ValueError:
        raise GraphfuseError(
            f"bad TensorRT version {version!r}: expected 10, 11, 10.13, ..."
        ) from None
    if major not in _LATEST:
        raise GraphfuseError(f"TensorRT {major} is not covered: the check knows 10.x and 11.x")
    return (major, minor) if minor is not None else _LATEST[major]


# ----------------------------------------------------------------------------------------------
# What the rules read off a value: an onnx_ir value carries its type, shape and constant, and a
# subgraph reads an outer value as that same object, so no per-scope table is needed
# ----------------------------------------------------------------------------------------------

# The constants the rules read (TopK's K, Dropout's is_training, zero points) are small: one in
# an external data file is read only up to this size, so the check never maps a model's weights.
_READ_LIMIT = 1 << 16  # bytes


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _output(node: ir.Node, index: int) -> ir.Value | None:
    """The ``index``-th output, if the node produces it (an unnamed optional output is absent)."""
    value = node.outputs[index] if len(node.outputs) > index else None
    return value if value is not None and value.name else None


def _elem_type(value: ir.Value | None) -> int | None:
    return int(value.dtype) if value is not None and value.dtype else None  # not UNDEFINED


def _rank(value: ir.Value | None) -> int | None:
    return None if value is None or value.shape is None else len(value.shape)


def _static(value: ir.Value | None) -> bool | None:
    """Whether every dimension of ``value`` is known; None when its shape is not."""
    return None if value is None or value.shape is None else value.shape.is_static()


def _is_constant(value: ir.Value | None) -> bool:
    """An initializer or a Constant node's output. Unlike `graphfuse.ir.is_constant`, an
    initializer that is also a graph input counts: the parser imports it as weights."""
    if value is None:
        return False
    node = value.producer()
    return value.const_value is not None or (
        node is not None and node.op_type == "Constant" and node.domain == ""
    )


def _value(value: ir.Value | None) -> np.ndarray | None:
    """A constant's values; None when computed, large and on disk, or unreadable."""
    try:
        tensor = irs_tensor(value, defaults=True)
        if tensor is None or (
            isinstance(tensor, ir.ExternalTensor) and tensor.nbytes > _READ_LIMIT
        ):
            return None
        return read(tensor)
    except (OSError, TypeError, ValueError):
        return None  # a malformed Constant or a missing data file: the value is unknown


# ----------------------------------------------------------------------------------------------
# Restrictions from the "Restrictions" column: one rule per line, each returning a reason or None
# ----------------------------------------------------------------------------------------------


class Caution(str):
    """A rule's reason that is a warning: the parser may reject it, the model cannot tell."""


@dataclass(frozen=True)
class _Ctx:
    node: ir.Node
    version: tuple[int, int]
    opset: int


Rule = Callable[[_Ctx], "str | None"]


def _constant_input(index: int, what: str, doc: str) -> Rule:
    def rule(c: _Ctx) -> str | None:
        value = _input(c.node, index)
        if value is not None and not _is_constant(value):
            return f"`{what}` is computed at run time; {doc} (fold it to an initializer)"
        return None

    return rule


def _reduce_axes(c: _Ctx) -> str | None:
    return _constant_input(1, "axes", "the parser needs an initializer")(c)


def _squeeze_axes(c: _Ctx) -> str | None:
    has_axes = _input(c.node, 1) is not None or attr(c.node, "axes") is not None
    if not has_axes and c.node.op_type == "Squeeze" and c.version < (11, 5):
        # Before 11.5 the parser infers omitted axes from the input's shape, which must be
        # static ("Cannot infer squeeze dimensions from a dynamic shape!").
        static = _static(_input(c.node, 0))
        if static is False:
            return "Squeeze without axes on a dynamic shape is supported from TensorRT 11.5"
        if static is None:
            return Caution("Squeeze without axes needs a static input shape before TensorRT 11.5")
        return None
    return _constant_input(1, "axes", "it must be resolvable to a constant")(c)


def _if_branches(c: _Ctx) -> str | None:
    then_graph, else_graph = attr(c.node, "then_branch"), attr(c.node, "else_branch")
    if not isinstance(then_graph, ir.Graph) or not isinstance(else_graph, ir.Graph):
        return None
    for then_out, else_out in zip(then_graph.outputs, else_graph.outputs, strict=False):
        if then_out.name == else_out.name:
            return f"both branches output a tensor named {then_out.name!r}; names must differ"
        ranks = [_rank(then_out), _rank(else_out)]
        if None not in ranks and ranks[0] != ranks[1]:
            return f"branch outputs {then_out.name!r}/{else_out.name!r} differ in rank {ranks}"
    return None


def _loop_scan_outputs(c: _Ctx) -> str | None:
    body = attr(c.node, "body")
    if not isinstance(body, ir.Graph):
        return None
    carried = len(c.node.inputs) - 2
    has_scan_outputs = len(body.outputs) - 1 > carried
    if has_scan_outputs and not _is_constant(_input(c.node, 0)):
        return "scan outputs need a constant trip count: scan output length cannot be dynamic"
    return None


def _attention(c: _Ctx) -> str | None:
    unsupported_inputs = {4: "past_key", 5: "past_value", 6: "nonpad_kv_seqlen"}
    unsupported_outputs = {1: "present_key", 2: "present_value", 3: "qk_matmul_output"}
    for index, name in unsupported_inputs.items():
        if _input(c.node, index) is not None:
            return f"input `{name}` is unsupported"
    for index, name in unsupported_outputs.items():
        if _output(c.node, index) is not None:
            return f"output `{name}` is unsupported"
    for name in ("qk_matmul_output_mode", "softcap"):
        if attr(c.node, name):
            return f"attribute `{name}` is unsupported"
    for index, name in ((0, "Q"), (1, "K"), (2, "V"), (3, "attn_mask")):
        rank = _rank(_input(c.node, index))
        if rank is not None and rank != 4:
            return f"`{name}` has rank {rank}; Q, K, V and attn_mask must be 4-D"
    return None


def _topk(c: _Ctx) -> str | None:
    if attr(c.node, "sorted", 1) != 1:
        return "`sorted` must be 1"
    k = _value(_input(c.node, 1))
    if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= 3840:
        return f"K = {int(k.reshape(-1)[0])}; K must be less than 3840"
    return None


def _dropout(c: _Ctx) -> str | None:
    is_training = _input(c.node, 2)
    if is_training is None:
        return None
    value = _value(is_training)
    if not _is_constant(is_training) or (value is not None and bool(value.reshape(-1)[0])):
        return "`is_training` must be an initializer that evaluates to False"
    return None


def _resize(c: _Ctx) -> str | None:
    allowed = {
        "coordinate_transformation_mode": (
            "half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric",
            "align_corners",
        ),
        "mode": ("nearest", "linear"),
        "nearest_mode": ("floor", "ceil", "round_prefer_floor", "round_prefer_ceil"),
        "keep_aspect_ratio_policy": ("stretch",),
    }  # fmt: skip
    for name, values in allowed.items():
        value = attr(c.node, name)
        if value is not None and value not in values:
            return f"{name}={value!r} is unsupported (supported: {', '.join(values)})"
    if attr(c.node, "antialias", 0):
        return "antialiasing is unsupported"
    return None


def _zero_point(index: int, what: str) -> Rule:
    def rule(c: _Ctx) -> str | None:
        value = _value(_input(c.node, index))
        if value is not None and np.any(value.astype(np.float64) != 0):
            return f"`{what}` must be zero"
        return None

    return rule


def _only_first_output(what: str) -> Rule:
    def rule(c: _Ctx) -> str | None:
        if any(output.name for output in c.node.outputs[1:]):
            return f"only the first output is supported ({what})"
        return None

    return rule


def _pooling(c: _Ctx) -> str | None:
    dilations = attr(c.node, "dilations")
    if isinstance(dilations, tuple) and any(d != 1 for d in dilations):
        return "`dilations` must be empty or all ones"
    kernel = attr(c.node, "kernel_shape")
    pooled = c.node.op_type in ("AveragePool", "MaxPool")
    if pooled and isinstance(kernel, tuple) and len(kernel) not in (2, 3):
        return f"{len(kernel)}-D pooling; only 2-D or 3-D pooling is supported"
    if c.node.op_type == "MaxPool" and _output(c.node, 1) is not None:
        return "the `Indices` output is unsupported"
    return None


def _constant_attrs(c: _Ctx) -> str | None:
    # (onnx_ir 1.1 cannot read a sparse_value yet: `_load` refuses such a model in one line)
    for name in ("sparse_value", "value_string", "value_strings"):
        if attr(c.node, name) is not None:
            return f"attribute `{name}` is unsupported"
    return None


def _eye_like(c: _Ctx) -> str | None:
    if _static(_input(c.node, 0)) is False:
        return "`input` must have static dimensions"
    return None


def _grid_sample(c: _Ctx) -> str | None:
    rank = _rank(_input(c.node, 0))
    allowed = (4, 5) if c.version >= (11, 2) else (4,)
    if rank is not None and rank not in allowed:
        return f"input has rank {rank}; supported ranks: {allowed}"
    return None


def _lstm(c: _Ctx) -> str | None:
    for name in ("input_forget", "layout"):
        if attr(c.node, name, 0) != 0:
            return f"attribute `{name}` must be 0"
    return None


def _rotary(c: _Ctx) -> str | None:
    if _elem_type(_input(c.node, 3)) not in (None, ir.DataType.INT64):
        return "`position_ids` must be INT64"
    return None


def _tensor_scatter(c: _Ctx) -> str | None:
    if attr(c.node, "axis", -2) != -2:
        return "`axis` must be -2"
    for index, name in ((0, "past_cache"), (1, "update")):
        rank = _rank(_input(c.node, index))
        if rank is not None and rank != 4:
            return f"`{name}` has rank {rank}; it must be 4-D"
    return None


def _scatter_nd(c: _Ctx) -> str | None:
    if attr(c.node, "reduction", "none") != "none":
        return "`reduction` other than none is unsupported"
    return None


def _stft(c: _Ctx) -> str | None:
    for index, name in ((1, "frame_step"), (2, "window")):
        value = _input(c.node, index)
        if value is not None and not _is_constant(value):
            return f"`{name}` must be an initializer"
    return None


_REDUCES = ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")
RULES: dict[str, Rule] = {
    **{f"Reduce{r}": _reduce_axes for r in _REDUCES},  # `axes` must be an initializer
    "Squeeze": _squeeze_axes,  # axes resolvable to a constant; omitted axes from 11.5
    "Unsqueeze": _squeeze_axes,  # axes resolvable to a constant
    "CumSum": _constant_input(1, "axis", "it must be a build-time constant"),
    "OneHot": _constant_input(1, "depth", "it must be a build-time constant"),
    "If": _if_branches,  # branch outputs: same rank, different names
    "Loop": _loop_scan_outputs,  # scan output length cannot be dynamic
    "Attention": _attention,  # no past_*/present_*, no softcap, 4-D Q/K/V/mask
    "TopK": _topk,  # sorted = 1, K < 3840
    "Dropout": _dropout,  # is_training: initializer, False
    "Resize": _resize,  # listed modes only, no antialias
    "DequantizeLinear": _zero_point(2, "x_zero_point"),  # zero
    "QuantizeLinear": _zero_point(2, "y_zero_point"),  # zero
    "LayerNormalization": _only_first_output("`Y`"),
    "AveragePool": _pooling,  # 2-D/3-D, dilations 1
    "MaxPool": _pooling,  # 2-D/3-D, dilations 1, no Indices
    "LpPool": _pooling,  # dilations 1
    "Constant": _constant_attrs,  # no sparse/string values
    "EyeLike": _eye_like,  # static dims
    "GridSample": _grid_sample,  # 4-D (5-D from 11.2)
    "LSTM": _lstm,  # input_forget = 0, layout = 0
    "RotaryEmbedding": _rotary,  # INT64 position_ids
    "TensorScatter": _tensor_scatter,  # axis -2, 4-D
    "ScatterND": _scatter_nd,  # reduction none
    "STFT": _stft,  # constant frame_step and window
}


# ----------------------------------------------------------------------------------------------
# The check
# ----------------------------------------------------------------------------------------------


def _supported_ops(version: tuple[int, int]) -> dict[str, str | None]:
    table: dict[str, str | None] = dict(_SUPPORTED_10)
    if version < _ATTENTION_SINCE:
        del table["Attention"]
    for since, op, types in _ADDED_OPS:
        if version >= since:
            table[op] = types
    return table


def _type_name(elem_type: int) -> str:
    return ir.DataType(elem_type).name


def _data_type(node: ir.Node) -> int | None:
    """The type the matrix's "Supported Types" refers to: the data input (or the output)."""
    if node.op_type == "Where":
        return _elem_type(_input(node, 1))
    if not node.inputs or node.op_type == "ConstantOfShape":
        return _elem_type(_output(node, 0))
    return _elem_type(node.inputs[0])


def _check_node(
    node: ir.Node,
    name: str,
    version: tuple[int, int],
    opset: int,
    table: dict[str, str | None],
    functions: set[tuple[str, str]],
) -> Iterator[Finding]:
    trt = f"TensorRT {version[0]}.{version[1]}"
    domain = node.domain  # onnx_ir spells the standard domain "" (never "ai.onnx")
    op = f"{domain}.{node.op_type}" if domain else node.op_type
    if (node.domain, node.op_type) in functions:
        return  # a model-local function: its body is checked where it is defined
    if domain:
        if node.op_type in _TRT_CUSTOM_OPS_11 and version >= (11, 0):
            return
        kind = (
            "ONNX-ML operators are not" if domain == "ai.onnx.ml" else f"domain {domain!r} is not"
        )
        yield Finding(
            op, name,
            f"{kind} part of {trt}'s ONNX parser; it imports only as a TensorRT plugin named "
            f"{node.op_type!r} registered before parsing",
        )  # fmt: skip
        return
    if node.op_type not in table:
        listed = "listed as unsupported" if node.op_type in _UNSUPPORTED_10 else "not listed"
        yield Finding(
            op, name,
            f"{listed} in {trt}'s ONNX operator matrix; the parser would need a TensorRT plugin "
            f"named {node.op_type!r}",
        )  # fmt: skip
        return
    types = table[node.op_type]
    data_type = _data_type(node)
    if data_type == ir.DataType.DOUBLE:
        yield Finding(op, name, "DOUBLE is cast down to FLOAT (clamped to +-FLT_MAX)", "warning")
    elif types is not None and data_type is not None:
        allowed = {_TYPE_CODES[t] for t in types.split()}
        if data_type not in allowed:
            yield Finding(
                op, name, f"{_type_name(data_type)} data is not supported (supported: {types})"
            )
    if node.op_type == "Cast":
        to = attr(node, "to")
        allowed = {_TYPE_CODES[t] for t in (types or "").split()}
        if isinstance(to, int) and to not in allowed and to != ir.DataType.DOUBLE:
            yield Finding(op, name, f"Cast to {_type_name(to)} is not supported")
    rule = RULES.get(node.op_type)
    reason = rule(_Ctx(node, version, opset)) if rule else None
    if reason:
        yield Finding(op, name, str(reason), "warning" if isinstance(reason, Caution) else "error")


def _walk(
    graph: ir.Graph | ir.Function,
    prefix: str,
    version: tuple[int, int],
    opset: int,
    table: dict[str, str | None],
    functions: set[tuple[str, str]],
) -> Iterator[Finding]:
    """Check each node of ``graph``, then the subgraphs it holds, named by their path
    ("If_0/then_branch/...")."""
    for index, node in enumerate(graph):
        name = f"{prefix}{node.name or f'#{index} ({node.op_type})'}"
        yield from _check_node(node, name, version, opset, table, functions)
        for attribute in node.attributes.values():
            if attribute.is_ref():
                continue  # a function's attribute reference holds no graph yet
            if attribute.type == ir.AttributeType.GRAPH:
                subgraphs: Sequence[ir.Graph] = [attribute.as_graph()]
            elif attribute.type == ir.AttributeType.GRAPHS:
                subgraphs = attribute.as_graphs()
            else:
                continue
            for sub in subgraphs:
                prefix_sub = f"{name}/{attribute.name}/"
                yield from _walk(sub, prefix_sub, version, opset, table, functions)


def _load(model: onnx.ModelProto | str | Path) -> ir.Model:
    if not isinstance(model, onnx.ModelProto) and not Path(model).is_file():
        raise GraphfuseError(f"ONNX file not found: {model}")
    # From a path, external weights stay on disk: only small constants are read.
    # A graph-only file is checked too: its data file is not needed (nor read past 64 KiB).
    loaded = (
        from_proto(model) if isinstance(model, onnx.ModelProto) else load(model, check_data=False)
    )
    infer_types(loaded)
    return loaded


def check_tensorrt(model: onnx.ModelProto | str | Path, version: str | int = "10") -> list[Finding]:
    """List what TensorRT's ONNX parser (`version` "10", "11", or e.g. "10.13") cannot take."""
    parsed = parse_version(version)
    loaded = _load(model)
    trt = f"TensorRT {parsed[0]}.{parsed[1]}"
    findings: list[Finding] = []
    opsets = loaded.opset_imports
    opset = next((v for d, v in opsets.items() if d in ("", "ai.onnx")), _OPSET_MIN)
    if opset > _opset_max(parsed):
        findings.append(
            Finding(
                "model", "(opset)",
                f"opset {opset} is newer than {trt}'s parser supports (opset {_OPSET_MIN} to "
                f"{_opset_max(parsed)}); convert it with onnx.version_converter",
            )
        )  # fmt: skip
    elif opset < _OPSET_MIN:
        findings.append(
            Finding(
                "model", "(opset)", f"opset {opset} is older than opset {_OPSET_MIN}", "warning"
            )
        )
    for value in [*loaded.graph.inputs, *loaded.graph.outputs]:
        if value.dtype == ir.DataType.DOUBLE:
            findings.append(
                Finding(
                    "model", value.name or "", "DOUBLE graph I/O is cast down to FLOAT", "warning"
                )
            )
    table = _supported_ops(parsed)
    functions = {(f.domain, f.name) for f in loaded.functions.values()}
    findings += _walk(loaded.graph, "", parsed, opset, table, functions)
    for function in loaded.functions.values():
        prefix = f"function {function.domain}.{function.name}/"
        findings += _walk(function, prefix, parsed, opset, table, functions)
    return findings


def format_findings(findings: Sequence[Finding], version: str | int = "10") -> str:
    """A table of findings and a one-line summary, for the command line."""
    major, minor = parse_version(version)
    source = f"TensorRT {major}.{minor} ONNX parser"
    if not findings:
        return f"no problems found for the {source} (a static check: build an engine to be sure)"
    width_op = max(len(f.op) for f in findings)
    width_node = min(48, max(len(f.node) for f in findings))
    lines = [
        f"{f.severity:<8} {f.op:<{width_op}}  {f.node:<{width_node}}  {f.reason}" for f in findings
    ]
    errors = sum(f.severity == "error" for f in findings)
    warnings = len(findings) - errors
    lines.append(f"{errors} error(s), {warnings} warning(s) for the {source}")
    return "\n".join(lines)


__all__ = ["RULES", "Finding", "check_tensorrt", "format_findings", "parse_version"]
