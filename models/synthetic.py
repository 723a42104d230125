"""Synthetic ONNX models of stacked gated FFN blocks, written node by node.

Each `Variant` field is one way real exporters spell the same block (brief, section 4), so the
recogniser can be tested on graphs that really have that shape, and `reference` computes the
sequential and the parallel (fused) results independently in float64 NumPy.

    build(hidden=64, intermediates=[128, 96, 128], attention_after={0}, variant=Variant(...))

A block is ``x + down(act(gate(n(x))) * up(n(x)))`` with ``n`` an RMSNorm with gain; a toy
single-head self-attention sub-block (Softmax over the sequence) can be placed after any block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

DTYPES = {
    "float32": (np.float32, TensorProto.FLOAT),
    "float16": (np.float16, TensorProto.FLOAT16),
    "bfloat16": (ml_dtypes.bfloat16, TensorProto.BFLOAT16),
}


@dataclass(frozen=True)
class Variant:
    # reciprocal | div | rmsnorm_op | simplified | skip (onnxruntime-genai's chain: block i's
    # residual Add lives in block i+1's SkipSimplifiedLayerNormalization, gains in the ops)
    norm: str = "reciprocal"
    square: str = "pow"  # pow | mul
    cast_island: bool = False  # norm in fp32 between Casts (what fp16/bf16 exports do)
    stray_casts: bool = False  # no-op Cast and CastLike on the block's edges
    weights: str = "matmul"  # matmul | transpose | gemm | reshape | nbits (MatMulNBits)
    bits: int = 4  # nbits: 4 or 8, quantised by onnxruntime's quantiser
    block_size: int = 16  # nbits
    zero_points: bool = False  # nbits: asymmetric, with uint8-packed zero points
    bias: bool = False
    commute: bool = False  # swap the operands of every Mul and Add
    gate_up: str = "separate"  # separate | split_gate_first | split_up_first | slice_…
    activation: str = "silu"  # silu | swish | gelu | gelu_tanh | gelu_op | gelu_tanh_op
    shared_gain: bool = False  # every norm gain is the same all-ones initializer

    @property
    def contrib(self) -> bool:
        """Uses com.microsoft ops (SkipSimplifiedLayerNormalization, MatMulNBits)."""
        return self.norm == "skip" or self.weights == "nbits"

    @property
    def opset(self) -> int:
        if self.activation == "swish":
            return 24
        if self.norm == "rmsnorm_op":
            return 23
        if self.activation.endswith("_op"):
            return 20
        return 18


@dataclass
class BlockWeights:
    gain: np.ndarray  # [H]
    gate: np.ndarray  # [H, I]
    up: np.ndarray  # [H, I]
    down: np.ndarray  # [I, H]
    eps: float
    gate_bias: np.ndarray | None = None
    up_bias: np.ndarray | None = None
    down_bias: np.ndarray | None = None


@dataclass
class AttentionWeights:
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray


@dataclass
class Synthetic:
    model: onnx.ModelProto
    blocks: list[BlockWeights]
    attention: dict[int, AttentionWeights] = field(default_factory=dict)
    activation: str = "silu"
    dtype: str = "float32"


class _Builder:
    def __init__(self, variant: Variant, np_dtype, elem: int) -> None:
        self.v = variant
        self.np_dtype = np_dtype
        self.elem = elem
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, TensorProto] = {}
        self.quantized: dict[str, tuple] = {}  # nbits: projection → (B, scales, zero points, k, n)

    def const(self, name: str, array: np.ndarray) -> str:
        if name not in self.inits:
            self.inits[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def scalar(self, value: float, dtype=None) -> str:
        dtype = dtype or self.np_dtype
        name = f"c_{np.dtype(dtype).name}_{value!r}"
        return self.const(name, np.array(value, dtype=dtype))

    def op(self, op_type: str, inputs: list[str], name: str, **attrs) -> str:
        if op_type in ("Mul", "Add") and self.v.commute:
            inputs = inputs[::-1]
        out = name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def leading_dims_and(self, n: int) -> str:
        """[batch, seq, n] from the graph input's shape, as exporters compute it."""
        name = f"shape/batch_seq_{n}"
        if not any(node.output[0] == name for node in self.nodes):
            if not any(node.output[0] == "shape/batch_seq" for node in self.nodes):
                shape = self.op("Shape", ["x"], "shape/x")
                zero, two = (self.const(f"i64_{k}", np.array([k], np.int64)) for k in (0, 2))
                self.op("Slice", [shape, zero, two], "shape/batch_seq")
            last = self.const(f"i64_{n}", np.array([n], np.int64))
            self.op("Concat", ["shape/batch_seq", last], name, axis=0)
        return name

    def cast(self, x: str, to: int, name: str) -> str:
        return self.op("Cast", [x], name, to=to)


def _norm(b: _Builder, x: str, w: BlockWeights, gain: str, p: str) -> str:
    v = b.v
    compute = TensorProto.FLOAT if v.cast_island else b.elem
    cdt = np.float32 if v.cast_island else b.np_dtype
    if v.cast_island:
        x = b.cast(x, TensorProto.FLOAT, f"{p}/cast_in")
    if v.norm in ("rmsnorm_op", "simplified"):
        ones = b.const(f"{p}/unit", np.ones(w.gain.shape, cdt))
        op, domain = (
            ("RMSNormalization", "")
            if v.norm == "rmsnorm_op"
            else ("SimplifiedLayerNormalization", "")
        )
        b.nodes.append(
            helper.make_node(
                op, [x, ones], [f"{p}/rms"], name=f"{p}/rms", axis=-1, epsilon=w.eps, domain=domain
            )
        )
        y = f"{p}/rms"
    else:
        sq = (
            b.op("Pow", [x, b.scalar(2.0, cdt)], f"{p}/pow")
            if v.square == "pow"
            else b.op("Mul", [x, x], f"{p}/square")
        )
        axes = b.const("axes_last", np.array([-1], np.int64))
        mean = b.op("ReduceMean", [sq, axes], f"{p}/mean", keepdims=1)
        var = b.op("Add", [mean, b.scalar(w.eps, cdt)], f"{p}/add_eps")
        rms = b.op("Sqrt", [var], f"{p}/sqrt")
        if v.norm == "div":
            y = b.op("Div", [x, rms], f"{p}/div")
        else:
            inv = b.op("Reciprocal", [rms], f"{p}/inv")
            y = b.op("Mul", [x, inv], f"{p}/scale")
    if v.cast_island:
        y = b.cast(y, b.elem, f"{p}/cast_out")
    del compute
    return b.op("Mul", [gain, y], f"{p}/gain")


def _skip_norm(
    b: _Builder, x: str, pending: tuple[str, str] | None, eps: float, gain: str, p: str
) -> tuple[str, str]:
    """(normed, stream): onnxruntime-genai's spelling. The first norm is a
    SimplifiedLayerNormalization of x; every later one a SkipSimplifiedLayerNormalization of
    the previous block's (x, y) whose output 3, x + y, carries the stream on."""
    if pending is None:
        b.nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, gain], [f"{p}/rms"],
                                        name=f"{p}/rms", axis=-1, epsilon=eps))  # fmt: skip
        return f"{p}/rms", x
    outputs = [f"{p}/rms", "", "", f"{p}/stream"]
    b.nodes.append(helper.make_node("SkipSimplifiedLayerNormalization", [*pending, gain], outputs,
                                    name=f"{p}/skip_rms", domain="com.microsoft", epsilon=eps))  # fmt: skip
    return f"{p}/rms", f"{p}/stream"


def _quantize(b: _Builder, w: BlockWeights, p: str) -> None:
    """Quantise the block's projections with onnxruntime's quantiser (the arrays MatMulNBits
    reads go to the builder) and keep their dequantised values as the block's weights, so the
    float64 reference computes with what the model computes with."""
    from graphfuse.blocks import Quant
    from graphfuse.nbits import dequantize, quantize

    v = b.v
    for role in ("gate", "up", "down"):
        matrix = getattr(w, role)
        k, n = matrix.shape
        quant = Quant("", None, v.bits, v.block_size, 0, k, n)
        packed, scales, zero_points = quantize(matrix, quant, zero_points=v.zero_points)
        b.quantized[f"{p}/{role}"] = (packed, scales, zero_points, k, n)
        setattr(w, role, dequantize(packed, scales, zero_points, quant).T.astype(matrix.dtype))


def _project(b: _Builder, x: str, w: np.ndarray, bias: np.ndarray | None, p: str) -> str:
    """x @ w (+ bias), spelled the way the variant says."""
    v = b.v
    if v.weights == "nbits":
        packed, scales, zero_points, k, n = b.quantized[p]
        inputs = [x, b.const(f"{p}/weight", packed), b.const(f"{p}/scales", scales)]
        if zero_points is not None:
            inputs.append(b.const(f"{p}/zero_points", zero_points))
        b.nodes.append(helper.make_node(
            "MatMulNBits", inputs, [f"{p}/matmul"], name=f"{p}/matmul", domain="com.microsoft",
            K=k, N=n, bits=v.bits, block_size=v.block_size, accuracy_level=0,
        ))  # fmt: skip
        y = f"{p}/matmul"
    elif v.weights in ("gemm", "reshape"):
        flat = b.op(
            "Reshape",
            [x, b.const(f"shape_2d_{w.shape[0]}", np.array([-1, w.shape[0]], np.int64))],
            f"{p}/flatten",
        )
        if v.weights == "gemm":
            wt = b.const(f"{p}/weight", w.T.copy())
            inputs = [flat, wt] + ([b.const(f"{p}/bias", bias)] if bias is not None else [])
            y = b.op("Gemm", inputs, f"{p}/gemm", transB=1)
            bias = None
        else:
            y = b.op("MatMul", [flat, b.const(f"{p}/weight", w)], f"{p}/matmul")
        y = b.op("Reshape", [y, b.leading_dims_and(w.shape[1])], f"{p}/unflatten")
    elif v.weights == "transpose":
        wt = b.op("Transpose", [b.const(f"{p}/weight", w.T.copy())], f"{p}/transpose", perm=[1, 0])
        y = b.op("MatMul", [x, wt], f"{p}/matmul")
    else:
        y = b.op("MatMul", [x, b.const(f"{p}/weight", w)], f"{p}/matmul")
    if bias is not None:
        y = b.op("Add", [y, b.const(f"{p}/bias", bias)], f"{p}/bias_add")
    return y


def _activation(b: _Builder, g: str, p: str) -> str:
    kind = b.v.activation
    if kind == "silu":
        return b.op("Mul", [g, b.op("Sigmoid", [g], f"{p}/sigmoid")], f"{p}/silu")
    if kind == "swish":
        return b.op("Swish", [g], f"{p}/swish")
    if kind == "gelu_op":
        return b.op("Gelu", [g], f"{p}/gelu")
    if kind == "gelu_tanh_op":
        return b.op("Gelu", [g], f"{p}/gelu", approximate="tanh")
    if kind == "gelu":  # 0.5 x (1 + erf(x / √2)), as the TorchScript exporter writes it
        erf = b.op("Erf", [b.op("Div", [g, b.scalar(1.4142135623730951)], f"{p}/div")], f"{p}/erf")
        half = b.op("Mul", [g, b.scalar(0.5)], f"{p}/half")
        return b.op("Mul", [half, b.op("Add", [erf, b.scalar(1.0)], f"{p}/one_plus")], f"{p}/gelu")
    if kind == "gelu_tanh":  # 0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))
        cube = b.op("Pow", [g, b.scalar(3.0)], f"{p}/cube")
        inner = b.op("Add", [g, b.op("Mul", [cube, b.scalar(0.044715)], f"{p}/c3")], f"{p}/inner")
        t = b.op(
            "Tanh", [b.op("Mul", [inner, b.scalar(0.7978845608028654)], f"{p}/scaled")], f"{p}/tanh"
        )
        half = b.op("Mul", [g, b.scalar(0.5)], f"{p}/half")
        return b.op("Mul", [half, b.op("Add", [t, b.scalar(1.0)], f"{p}/one_plus")], f"{p}/gelu")
    raise ValueError(f"unknown activation {kind!r}")


def _gate_up(b: _Builder, z: str, w: BlockWeights, p: str) -> tuple[str, str]:
    mode = b.v.gate_up
    if mode == "separate":
        return (
            _project(b, z, w.gate, w.gate_bias, f"{p}/gate"),
            _project(b, z, w.up, w.up_bias, f"{p}/up"),
        )
    gate_first = mode.endswith("gate_first")
    parts = [w.gate, w.up] if gate_first else [w.up, w.gate]
    biases = [w.gate_bias, w.up_bias] if gate_first else [w.up_bias, w.gate_bias]
    packed_bias: np.ndarray | None = None if biases[0] is None else np.concatenate(biases)  # type: ignore[arg-type]
    y = _project(b, z, np.concatenate(parts, axis=1), packed_bias, f"{p}/gate_up")
    n = w.gate.shape[1]
    if mode.startswith("split"):
        outs = [f"{p}/part0", f"{p}/part1"]
        sizes = b.const(f"split_{n}", np.array([n, n], np.int64))
        b.nodes.append(helper.make_node("Split", [y, sizes], outs, name=f"{p}/split", axis=-1))
    else:
        axes = b.const("axes_last", np.array([-1], np.int64))
        bounds = [(0, n), (n, 2**62)]
        outs = [
            b.op(
                "Slice",
                [
                    y,
                    b.const(f"i64_{s}", np.array([s], np.int64)),
                    b.const(f"i64_{e}", np.array([e], np.int64)),
                    axes,
                ],
                f"{p}/slice{k}",
            )
            for k, (s, e) in enumerate(bounds)
        ]
    return (outs[0], outs[1]) if gate_first else (outs[1], outs[0])


def _attention(b: _Builder, x: str, a: AttentionWeights, p: str) -> str:
    q = b.op("MatMul", [x, b.const(f"{p}/q", a.q)], f"{p}/q_proj")
    k = b.op("MatMul", [x, b.const(f"{p}/k", a.k)], f"{p}/k_proj")
    v = b.op("MatMul", [x, b.const(f"{p}/v", a.v)], f"{p}/v_proj")
    kt = b.op("Transpose", [k], f"{p}/k_t", perm=[0, 2, 1])
    scores = b.op("MatMul", [q, kt], f"{p}/scores")
    probs = b.op("Softmax", [scores], f"{p}/softmax", axis=-1)
    return b.op("Add", [x, b.op("MatMul", [probs, v], f"{p}/mix")], f"{p}/residual")


def build(
    hidden: int = 64,
    intermediates: list[int] | tuple[int, ...] = (128, 128, 128, 128),
    *,
    attention_after: set[int] | frozenset[int] = frozenset(),
    variant: Variant = Variant(),
    dtype: str = "float32",
    eps: float | list[float] = 1e-5,
    seed: int = 0,
) -> Synthetic:
    """A stack of FFN blocks (and toy attention after the blocks named) as an ONNX model."""
    np_dtype, elem = DTYPES[dtype]
    rng = np.random.default_rng(seed)
    b = _Builder(variant, np_dtype, elem)
    epss = eps if isinstance(eps, list) else [eps] * len(intermediates)
    scale = 1.0 / np.sqrt(hidden)

    def rand(*shape, s=scale):
        return (rng.standard_normal(shape) * s).astype(np_dtype)

    weights: list[BlockWeights] = []
    attention: dict[int, AttentionWeights] = {}
    pending: tuple[str, str] | None = None  # skip: the residual Add the next norm performs
    x = "x"
    if variant.stray_casts and dtype == "float32":
        x = b.cast(x, TensorProto.FLOAT, "stray/cast")
    for i, inter in enumerate(intermediates):
        gain = (
            np.ones(hidden, np_dtype)
            if variant.shared_gain
            else (1 + 0.2 * rng.standard_normal(hidden)).astype(np_dtype)
        )
        w = BlockWeights(
            gain,
            rand(hidden, inter),
            rand(hidden, inter),
            rand(inter, hidden, s=inter**-0.5),
            epss[i],
        )
        if variant.bias:
            w.gate_bias, w.up_bias, w.down_bias = (
                rand(inter, s=0.1),
                rand(inter, s=0.1),
                rand(hidden, s=0.1),
            )
        weights.append(w)
        p = f"block{i}"
        if variant.weights == "nbits":
            _quantize(b, w, p)
        gain_name = b.const("gain_ones" if variant.shared_gain else f"{p}/norm/gamma", gain)
        if variant.norm == "skip":
            z, x = _skip_norm(b, x, pending, w.eps, gain_name, f"{p}/norm")
        else:
            z = _norm(b, x, w, gain_name, f"{p}/norm")
        gate, up = _gate_up(b, z, w, p)
        h = b.op("Mul", [_activation(b, gate, f"{p}/act"), up], f"{p}/product")
        y = _project(b, h, w.down, w.down_bias, f"{p}/down")
        if variant.stray_casts and dtype == "float32":
            y = b.op("CastLike", [y, x], f"{p}/castlike")
        last = i == len(intermediates) - 1
        if variant.norm == "skip" and not last and i not in attention_after:
            pending = (x, y)  # block i+1's norm adds them
            continue
        pending = None
        x = b.op("Add", [x, y], f"{p}/residual")
        if i in attention_after:
            a = AttentionWeights(rand(hidden, hidden), rand(hidden, hidden), rand(hidden, hidden))
            attention[i] = a
            x = _attention(b, x, a, f"attn{i}")
    b.nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(
        b.nodes,
        "ffn_stack",
        [helper.make_tensor_value_info("x", elem, ["batch", "seq", hidden])],
        [helper.make_tensor_value_info("y", elem, ["batch", "seq", hidden])],
        list(b.inits.values()),
    )
    opsets = [helper.make_opsetid("", variant.opset)]
    if variant.contrib:
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    model = helper.make_model(graph, opset_imports=opsets, ir_version=10)
    return Synthetic(model, weights, attention, _kind(variant.activation), dtype)


def _kind(activation: str) -> str:
    return {"swish": "silu", "gelu_op": "gelu", "gelu_tanh_op": "gelu_tanh"}.get(
        activation, activation
    )


# -- the independent reference ---------------------------------------------------------------------


def act(kind: str, x: np.ndarray) -> np.ndarray:
    from math import erf, pi, sqrt

    if kind == "silu":
        return x / (1 + np.exp(-x))
    if kind == "gelu":
        return 0.5 * x * (1 + np.vectorize(erf)(x / sqrt(2)))
    if kind == "gelu_tanh":
        return 0.5 * x * (1 + np.tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))
    raise ValueError(kind)


def ffn(w: BlockWeights, x: np.ndarray, activation: str) -> np.ndarray:
    """FFN_i(n_i(x)) in float64."""
    f = lambda a: None if a is None else a.astype(np.float64)  # noqa: E731
    z = f(w.gain) * x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + w.eps)
    gate = z @ f(w.gate) + (0 if w.gate_bias is None else f(w.gate_bias))
    up = z @ f(w.up) + (0 if w.up_bias is None else f(w.up_bias))
    out = (act(activation, gate) * up) @ f(w.down)
    return out + (0 if w.down_bias is None else f(w.down_bias))


def attend(a: AttentionWeights, x: np.ndarray) -> np.ndarray:
    q, k, v = (x @ m.astype(np.float64) for m in (a.q, a.k, a.v))
    s = q @ k.transpose(0, 2, 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    return x + (p / p.sum(-1, keepdims=True)) @ v


def reference(model: Synthetic, x: np.ndarray, runs: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """The model's output in float64 with each run (first, last) of blocks made parallel:
    X_out = X + Σ FFN_i(n_i(X)) — the result FFN Fusion must reproduce exactly."""
    x = x.astype(np.float64)
    starts = {a: b for a, b in runs}
    i = 0
    while i < len(model.blocks):
        last = starts.get(i, i)
        x = x + sum(ffn(model.blocks[j], x, model.activation) for j in range(i, last + 1))
        for j in range(i, last + 1):
            if j in model.attention and j != last:
                raise ValueError(f"run {i}-{last} has attention after block {j}")
        if last in model.attention:
            x = attend(model.attention[last], x)
        i = last + 1
    return x


# -- exporter spellings of the block's constants -------------------------------------------------
#
# The same models as `build` makes, with constants spelled the way exporters write them: not as
# initializers but as `Constant` nodes cast with `CastLike`, ReduceMean axes computed by a
# `Reshape` of constants, weights read through `Identity`. What the model computes is unchanged,
# so `reference` still holds; the recogniser only finds the blocks once `graphfuse.canonical`
# has folded these constants back into initializers.


def _initializer_input(model: onnx.ModelProto, node: onnx.NodeProto) -> int:
    """The position of the one input of ``node`` that is an initializer."""
    names = {t.name for t in model.graph.initializer}
    (position,) = (k for k, name in enumerate(node.input) if name in names)
    return position


def _respell(
    model: onnx.ModelProto, rewrite: dict[str, Callable[[onnx.NodeProto], list[onnx.NodeProto]]]
) -> onnx.ModelProto:
    """A copy of ``model`` where each node named in ``rewrite`` is preceded by the nodes its
    rewrite returns (which may also change the node's inputs); initializers left unused go."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.name in rewrite:
            nodes.extend(rewrite[node.name](node))
        nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    used = {name for node in out.graph.node for name in node.input}
    kept = [t for t in out.graph.initializer if t.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


def _constant_castlike(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The node's initializer input as ``CastLike(Constant(float64 value), other input)``, as the
    dynamo exporter writes scalars and gains."""
    k = _initializer_input(model, node)
    (tensor,) = (t for t in model.graph.initializer if t.name == node.input[k])
    value = numpy_helper.to_array(tensor).astype(np.float64)
    const, cast = f"{node.name}/const", f"{node.name}/castlike"
    node.input[k] = cast
    return [
        helper.make_node(
            "Constant", [], [const], name=const, value=numpy_helper.from_array(value, const)
        ),
        helper.make_node("CastLike", [const, node.input[1 - k]], [cast], name=cast),
    ]


def _axes_from_reshape(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """ReduceMean's axes as ``Reshape(Constant([[-1]]), Constant([1]))``."""
    p = node.name
    node.input[1] = f"{p}/axes"
    return [
        helper.make_node(
            "Constant",
            [],
            [f"{p}/axes_2d"],
            name=f"{p}/axes_2d",
            value=numpy_helper.from_array(np.array([[-1]], np.int64)),
        ),
        helper.make_node(
            "Constant",
            [],
            [f"{p}/axes_shape"],
            name=f"{p}/axes_shape",
            value=numpy_helper.from_array(np.array([1], np.int64)),
        ),
        helper.make_node(
            "Reshape", [f"{p}/axes_2d", f"{p}/axes_shape"], [f"{p}/axes"], name=f"{p}/axes"
        ),
    ]


def _identity_weight(model: onnx.ModelProto, node: onnx.NodeProto) -> list[onnx.NodeProto]:
    """The node's weight read through an ``Identity`` (what tied or renamed weights export as)."""
    k = _initializer_input(model, node)
    alias = f"{node.name}/weight_alias"
    identity = helper.make_node("Identity", [node.input[k]], [alias], name=alias)
    node.input[k] = alias
    return [identity]


def _nodes(model: onnx.ModelProto, suffix: str, op_type: str) -> list[str]:
    return [n.name for n in model.graph.node if n.op_type == op_type and n.name.endswith(suffix)]


def constants_as_castlike(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every norm's eps, Pow exponent and gain as ``CastLike(Constant, ·)``."""
    names = (
        _nodes(model, "/norm/add_eps", "Add")
        + _nodes(model, "/norm/pow", "Pow")
        + _nodes(model, "/norm/gain", "Mul")
    )
    return _respell(model, dict.fromkeys(names, partial(_constant_castlike, model)))


def axes_from_reshape(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every ReduceMean's axes from a ``Reshape`` of two ``Constant`` nodes."""
    names = _nodes(model, "/norm/mean", "ReduceMean")
    return _respell(model, dict.fromkeys(names, partial(_axes_from_reshape, model)))


def identity_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every MatMul weight read through an ``Identity``."""
    names = _nodes(model, "/matmul", "MatMul")
    return _respell(model, dict.fromkeys(names, partial(_identity_weight, model)))


def all_spellings(model: onnx.ModelProto) -> onnx.ModelProto:
    return identity_weights(axes_from_reshape(constants_as_castlike(model)))


# name → rewrite of a `build` model; the recogniser needs `graphfuse.canonical` for each of these.
SPELLINGS: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
    "constant_castlike": constants_as_castlike,
    "axes_from_reshape": axes_from_reshape,
    "identity_weights": identity_weights,
    "all_spellings": all_spellings,
}


def build_spelled(spelling: str, *args, **kwargs) -> Synthetic:
    """`build(*args, **kwargs)` with its constants spelled as ``SPELLINGS[spelling]`` says."""
    synthetic = build(*args, **kwargs)
    synthetic.model = SPELLINGS[spelling](synthetic.model)
    return synthetic
