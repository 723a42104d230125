"""Recognise gated feed-forward blocks (SwiGLU, GeGLU) in an ONNX graph.

One block, as exporters write it (every edge may carry Cast/CastLike; Mul and Add commute)::

    X ──┬──────────────────────────────────────────────────────────────┐
        └─ norm island ─ z ─┬─ gate proj ─ activation island ─┐        │
           (RMSNorm, gain γ) └─ up proj ─────────────────────── Mul ─ down proj ─ Add ─ X'

A *projection* is ``MatMul(z, W)``, ``MatMul(z, Transpose(W))`` or ``Gemm(z, W, transB)``,
optionally wrapped in ``Reshape`` to 2-D and back, optionally followed by a bias ``Add``, and
optionally reading one part of a packed gate/up product through ``Split`` or ``Slice``.

The *norm island* is every node between X and z: element-wise ops around exactly one
normalisation (a decomposed ``ReduceMean`` chain, ``RMSNormalization``, or ONNX Runtime's
``SimplifiedLayerNormalization``). Its shape does not matter — Div or Reciprocal, Pow or Mul,
where the Casts sit — because it is checked by what it computes: evaluated with its gain set to
one, it must give x / sqrt(mean(x²) + eps). The *activation island* is every element-wise node
between the gate projection and the product; it is named by its distinguishing op.

Each match is a `FfnBlock`; each candidate that looked like a block and was refused is a
`NearMiss` with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphfuse.ir import (
    ELEMENTWISE,
    NORM_OPS,
    attr,
    constant,
    constant_shape,
    elem_type,
    is_constant,
    label,
    producer,
    rank,
    read,
    readers,
    runnable,
    scalar,
)
from graphfuse.ir import order as node_order

CASTS = ("Cast", "CastLike")


class NoMatch(Exception):
    """A candidate is not an FFN block; ``reason`` says why, for the user's report."""

    def __init__(self, reason: str, *, near: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.near = near  # it got far enough to be worth reporting


@dataclass(frozen=True)
class Quant:
    """How a ``MatMulNBits`` (com.microsoft) stores its [K, N] weight: B is [N, K/block,
    block·bits/8] uint8, packed per output row and blocked along K; ``scales`` is [N, K/block]
    (or flat); ``zero_points`` is absent (zero point 2^(bits-1)), uint8 packed like B, or of the
    scales' type."""

    scales: str
    zero_points: str | None
    bits: int
    block_size: int
    accuracy_level: int
    k: int
    n: int

    @property
    def blocks(self) -> int:
        return -(-self.k // self.block_size)


def initializer(initializers: Mapping[str, ir.Value], name: str) -> np.ndarray:
    """The values of the initializer ``name`` (read from external data when stored there);
    ``initializers`` is a graph's (``graph.initializers``) or a copy of that mapping."""
    value = initializers.get(name)
    if value is None or value.const_value is None:
        raise KeyError(f"'{name}' is not an initializer of the graph")
    return read(value.const_value)


@dataclass(frozen=True)
class Weight:
    """A constant matrix or vector as stored, and how to read it as the math wants it."""

    name: str
    transposed: bool = False  # stored [out, in] (Transpose(W) or Gemm transB=1)
    columns: tuple[int, int] | None = None  # the output features this projection owns
    constant: bool = True  # False: computed at run time, so the block cannot be fused
    quant: Quant | None = None  # MatMulNBits packing, where the weight is quantised

    def load(self, initializers: Mapping[str, ir.Value]) -> np.ndarray:
        """The matrix as [in, out] (a bias as [out]), in its stored dtype (a quantised weight
        dequantised to its scales' dtype)."""
        if self.quant is not None:
            from graphfuse.nbits import dequantize

            q = self.quant
            zero_points = initializer(initializers, q.zero_points) if q.zero_points else None
            scales = initializer(initializers, q.scales)
            return dequantize(initializer(initializers, self.name), scales, zero_points, q).T
        array = initializer(initializers, self.name)
        if self.transposed:
            array = array.T
        if self.columns is not None:
            array = array[..., self.columns[0] : self.columns[1]]
        return array


@dataclass(frozen=True)
class Projection:
    input: str
    output: str
    weight: Weight
    bias: Weight | None
    shape: tuple[int, int]  # (in, out) features
    nodes: frozenset[ir.Node]
    x: ir.Value = field(compare=False, repr=False)  # the value named ``input``


@dataclass(frozen=True)
class Norm:
    input: str  # X, the residual stream
    output: str  # z, read by the gate and up projections
    nodes: frozenset[ir.Node]
    eps: float
    gains: tuple[tuple[ir.Node, str], ...]  # (node, constant): γ is their product; none: γ = 1
    op: str  # ReduceMean | RMSNormalization | SimplifiedLayerNormalization


@dataclass(frozen=True)
class FfnBlock:
    """One gated FFN block with pre-norm and residual, as found in the graph. Values are named;
    nodes are the graph's own."""

    index: int  # position among the blocks, in graph order
    residual_in: str
    residual_out: str
    residual_add: ir.Node
    norm: Norm
    gate: Projection
    up: Projection
    down: Projection
    activation: str
    activation_nodes: frozenset[ir.Node]
    activation_input: str  # the gate value the activation island reads
    activation_output: str
    product: ir.Node  # the Mul of activation and up
    down_casts: tuple[ir.Node, ...]  # Casts between the down projection and the residual Add
    nodes: frozenset[ir.Node]
    hidden: int
    intermediate: int
    dtype: str
    signature: tuple = field(compare=False, repr=False)  # activation island, for equality

    @property
    def parameters(self) -> int:
        return 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class NearMiss:
    """A residual Add that looked like an FFN block but was refused; ``near`` when it got as
    far as a gated product with its projections."""

    node: int  # the Add's position in the graph
    name: str
    reason: str
    near: bool = True


def dtype_name(elem: int | None) -> str:
    if elem is None:
        return "unknown"
    return helper.tensor_dtype_to_np_dtype(elem).name if elem != 16 else "bfloat16"


# -- projections ---------------------------------------------------------------------------------


def _bias(value: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """``Add(v, b)`` with a constant vector b, either operand order: (v, b)."""
    node = producer(value, "Add")
    if node is None or len(node.inputs) != 2:
        return None
    for a, b in (node.inputs, reversed(node.inputs)):
        shape = constant_shape(b)
        if shape and all(d == 1 for d in shape[:-1]) and producer(a) is not None:
            return a, b  # type: ignore[return-value]
    return None


def _weight(value: ir.Value, transposed: bool) -> tuple[Weight, list[ir.Node]]:
    """A constant weight, seen through one ``Transpose`` — else NoMatch."""
    node = producer(value, "Transpose")
    nodes = []
    if node is not None and is_constant(node.inputs[0]):
        if list(attr(node, "perm", [1, 0])) != [1, 0]:  # type: ignore[call-overload]
            raise NoMatch(f"weight transpose '{node.name}' is not a 2-D transpose")
        nodes.append(node)
        value, transposed = node.inputs[0], not transposed  # type: ignore[assignment]
    if not _stored(value):
        return Weight(value.name or "", transposed, constant=False), nodes
    if len(constant_shape(value) or ()) != 2:
        raise NoMatch(f"weight '{value.name}' is not a matrix")
    return Weight(value.name or "", transposed), nodes


def match_projection(value: ir.Value) -> Projection:
    """The projection producing ``value`` (see the module docstring for its forms)."""
    nodes: list[ir.Node] = []
    columns: tuple[int, int] | None = None
    biases: list[ir.Value] = []
    v = value

    def strip_bias(v: ir.Value) -> ir.Value:
        if (found := _bias(v)) is None:
            return v
        nodes.append(v.producer())  # type: ignore[arg-type]
        biases.append(found[1])
        return found[0]

    v = strip_bias(v)
    packed = producer(v)
    if packed is not None and packed.op_type in ("Split", "Slice"):
        columns = _packed_columns(packed, v)
        nodes.append(packed)
        v = strip_bias(packed.inputs[0])  # type: ignore[arg-type]
    reshaped = producer(v, "Reshape")
    if reshaped is not None:
        nodes.append(reshaped)
        v = strip_bias(reshaped.inputs[0])  # type: ignore[arg-type]
    core = producer(v)
    if core is None:
        raise NoMatch(f"'{value.name}' is not computed by a projection")
    nodes.append(core)
    if core.op_type == "MatMul":
        weight, extra = _weight(core.inputs[1], transposed=False)  # type: ignore[arg-type]
    elif core.op_type == "Gemm":
        if attr(core, "transA", 0) or attr(core, "alpha", 1.0) != 1.0:
            raise NoMatch(f"Gemm '{core.name}' scales or transposes its input")
        weight, extra = _weight(core.inputs[1], transposed=bool(attr(core, "transB", 0)))  # type: ignore[arg-type]
        if len(core.inputs) > 2 and core.inputs[2] is not None:
            if attr(core, "beta", 1.0) != 1.0:
                raise NoMatch(f"Gemm '{core.name}' scales its bias")
            biases.append(core.inputs[2])
    elif core.op_type == "MatMulNBits" and core.domain == "com.microsoft":
        weight, bias_input = _nbits_weight(core)
        if bias_input is not None:
            biases.append(bias_input)
        extra = []
    else:
        raise NoMatch(f"'{value.name}' is computed by {core.op_type}, not MatMul or Gemm")
    nodes.extend(extra)
    x = core.inputs[0]
    if reshaped is not None:
        inner = producer(x, "Reshape")
        if inner is None:
            raise NoMatch(f"projection '{core.name}' reshapes its output but not its input")
        nodes.append(inner)
        x = inner.inputs[0]
    if weight.quant is not None:
        rows, cols = weight.quant.k, weight.quant.n
    else:
        rows, cols = constant_shape(_value_of(core.inputs[1])) or (-1, -1)
    fan_in, fan_out = (cols, rows) if weight.transposed else (rows, cols)
    if columns is not None:
        if weight.quant is not None:
            raise NoMatch(f"packed gate/up '{core.name}' is quantised: not supported")
        weight = Weight(weight.name, weight.transposed, columns, weight.constant)
        fan_out = columns[1] - columns[0]
    if len(biases) > 1:
        raise NoMatch(f"projection '{core.name}' has more than one bias")
    if biases and not _stored(biases[0]):
        raise NoMatch(f"bias '{biases[0].name}' of projection '{core.name}' is not an initializer")
    bias = None
    if biases:
        full = constant_shape(biases[0])[-1]  # type: ignore[index]
        bias_columns = columns if columns is not None and full != fan_out else None
        bias = Weight(biases[0].name or "", columns=bias_columns)
    assert x is not None
    return Projection(x.name or "", value.name or "", weight, bias, (fan_in, fan_out),
                      frozenset(nodes), x)  # fmt: skip


def _stored(value: ir.Value | None) -> bool:
    """A constant the passes can read by name: an initializer that is not a graph input (a
    Constant node that folding did not lift is a constant, but not one a weight may be)."""
    return value is not None and value.is_initializer() and not value.is_graph_input()


def _value_of(value: ir.Value | None) -> ir.Value | None:
    """A weight input seen through its Transpose (for its stored shape)."""
    node = producer(value, "Transpose")
    return node.inputs[0] if node is not None and is_constant(node.inputs[0]) else value


def _nbits_weight(node: ir.Node) -> tuple[Weight, ir.Value | None]:
    """The quantised weight of a ``MatMulNBits`` node and its bias input, if any."""
    inputs = [*node.inputs, None, None, None, None]
    b, scales, zero_points, g_idx, bias = inputs[1:6]
    if g_idx is not None:
        raise NoMatch(
            f"MatMulNBits '{node.name}' has a g_idx input (act-order): its rows are permuted, "
            "which graphfuse does not fuse"
        )
    for v in (b, scales, zero_points):
        if v is not None and not _stored(v):
            return Weight(v.name or "", constant=False), None
    assert b is not None and scales is not None
    attrs = {a.name: a.value for a in node.attributes.values()}
    quant = nbits_layout(attrs, scales.name or "", zero_points.name if zero_points else None)
    return Weight(b.name or "", quant=quant), bias


def nbits_layout(attrs: Mapping[str, object], scales: str, zero_points: str | None) -> Quant:
    """A ``MatMulNBits`` node's storage, from its attributes and its scales and zero points."""
    return Quant(
        scales=scales,
        zero_points=zero_points,
        bits=int(attrs.get("bits", 4)),  # type: ignore[call-overload]
        block_size=int(attrs.get("block_size", 0)),  # type: ignore[call-overload]
        accuracy_level=int(attrs.get("accuracy_level", 0)),  # type: ignore[call-overload]
        k=int(attrs.get("K", 0)),  # type: ignore[call-overload]
        n=int(attrs.get("N", 0)),  # type: ignore[call-overload]
    )


def weight_dtype(initializers: Mapping[str, ir.Value], weight: Weight) -> int | None:
    """The element type a projection computes in: the stored weight's, or a quantised
    weight's scales'."""
    return elem_type(initializers.get(weight.quant.scales if weight.quant else weight.name))


def _packed_columns(node: ir.Node, value: ir.Value) -> tuple[int, int]:
    """Which output features of a packed gate/up product a Split or Slice output holds."""
    source = node.inputs[0]
    assert source is not None
    source_shape = match_projection(source).shape[1]
    last = (-1, (rank(source) or -98) - 1)  # an unknown rank: only the -1 spelling is accepted
    if node.op_type == "Split":
        if int(attr(node, "axis", 0)) not in last:  # type: ignore[call-overload]
            raise NoMatch(f"Split '{node.name}' is not along the feature axis")
        k = list(node.outputs).index(value)
        sizes: list[int]
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            given = constant(node.inputs[1])
            if given is None:
                raise NoMatch(f"Split '{node.name}' has sizes that are not constant")
            sizes = [int(s) for s in given]
        elif attr(node, "split") is not None:
            sizes = list(attr(node, "split"))  # type: ignore[call-overload]
        else:
            sizes = [source_shape // len(node.outputs)] * len(node.outputs)
        start = sum(sizes[:k])
        return start, start + sizes[k]
    # Slice(data, starts, ends, axes, steps)
    parts = [constant(v) if v is not None else None for v in node.inputs[1:5]]
    if any(p is None for p in parts[:2]) or (len(parts) > 2 and parts[2] is None):
        raise NoMatch(f"Slice '{node.name}' has bounds that are not constant")
    starts, ends = int(parts[0][0]), int(parts[1][0])  # type: ignore[index]
    axes = int(parts[2][0]) if len(parts) > 2 else 0  # type: ignore[index]
    steps = int(parts[3][0]) if len(parts) > 3 and parts[3] is not None else 1
    if axes not in last or steps != 1:
        raise NoMatch(f"Slice '{node.name}' is not a contiguous feature slice")
    starts = starts + source_shape if starts < 0 else starts
    ends = ends + source_shape if ends < 0 else ends
    return max(0, starts), min(source_shape, ends)


# -- islands -------------------------------------------------------------------------------------


def _island(
    output: ir.Value, is_leaf, allowed: frozenset[str]
) -> tuple[frozenset[ir.Node], set[ir.Value]]:
    """Nodes between ``output`` and the values where ``is_leaf`` holds, walking producers."""
    nodes: set[ir.Node] = set()
    leaves: set[ir.Value] = set()
    stack = [output]
    seen: set[ir.Value] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if is_leaf(v):
            leaves.add(v)
            continue
        if is_constant(v):
            continue
        node = v.producer()
        if node is None:
            raise NoMatch(f"'{v.name}' comes from outside the block (a graph input)")
        if node.op_type not in allowed:
            raise NoMatch(f"{node.op_type} '{node.name}' is not part of a gated FFN")
        nodes.add(node)
        stack.extend(i for i in node.inputs if i is not None)
    return frozenset(nodes), leaves


def _activation_name(nodes: frozenset[ir.Node]) -> str:
    ops = {n.op_type: n for n in nodes}
    if "Gelu" in ops:
        return "gelu_tanh" if attr(ops["Gelu"], "approximate", "none") == "tanh" else "gelu"
    if "Tanh" in ops:
        return "gelu_tanh"
    if "Erf" in ops:
        return "gelu"
    if "Swish" in ops or "Sigmoid" in ops:
        return "silu"
    return "other"


def _island_signature(nodes: frozenset[ir.Node], entry: ir.Value, order: dict) -> tuple:
    """What an island computes, up to value names: ops, attributes, constants, wiring."""
    names: dict[ir.Value, str] = {entry: "in"}
    rows: list[tuple] = []
    for node in sorted(nodes, key=order.__getitem__):
        ins = []
        for v in node.inputs:
            if v is None:
                ins.append("")
            elif v in names:
                ins.append(names[v])
            elif is_constant(v):
                shape = constant_shape(v) or ()
                ins.append(repr(scalar(v)) if int(np.prod(shape)) == 1 else f"const{shape}")
            else:
                ins.append(v.name or "")
        for k, v in enumerate(node.outputs):
            names[v] = f"{len(rows)}.{k}"
        attrs = sorted((a.name, str(a.value)) for a in node.attributes.values())
        rows.append((node.op_type, tuple(ins), tuple(attrs)))
    return tuple(rows)


# -- the norm --------------------------------------------------------------------------------------


# How far an island may stray from x / rms(x) and still be that: float rounding of the island's
# own dtype over ~6 ops (fp16 and bf16 round at 2^-11 and 2^-8).
NORM_TOLERANCE: dict[int, float] = {onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 5e-2}


def match_norm(z: ir.Value, x: ir.Value, dtype: int, z_dtype: int, ctx: _Context) -> Norm:
    """The RMSNorm island between the residual stream ``x`` and the projections' input ``z``;
    ``dtype`` and ``z_dtype`` are their element types."""
    nodes, leaves = _island(z, lambda v: v is x, ELEMENTWISE | NORM_OPS)
    if leaves != {x}:
        raise NoMatch("the projections do not read the normalised residual stream", near=True)
    reductions = [n for n in nodes if n.op_type in NORM_OPS]
    if len(reductions) != 1:
        raise NoMatch(f"norm has {len(reductions)} normalisations, not one", near=True)
    (reduce_node,) = reductions
    op = reduce_node.op_type
    # The gains: per-channel constants that multiply, and a norm op's scale input.
    gains: list[tuple[ir.Node, ir.Value]] = [
        (n, v)
        for n in sorted(nodes, key=ctx.order.__getitem__)
        for v in n.inputs
        if v is not None and n.op_type == "Mul" and (constant_shape(v) or (1,))[-1] > 1
    ]
    if op == "ReduceMean":
        eps = _eps_after(reduce_node.outputs[0], nodes)
    else:
        eps = float(attr(reduce_node, "epsilon", 1e-5))  # type: ignore[arg-type]
        last = (-1, (rank(reduce_node.inputs[0]) or -98) - 1)  # type: ignore[arg-type]
        if attr(reduce_node, "axis", -1) not in last:
            raise NoMatch(f"{op} '{reduce_node.name}' does not normalise the last axis", near=True)
        scale = reduce_node.inputs[1] if len(reduce_node.inputs) > 1 else None
        if scale is not None:
            if not is_constant(scale):
                raise NoMatch(f"{op} scale '{scale.name}' is not constant", near=True)
            gains.append((reduce_node, scale))
        if len(reduce_node.inputs) > 2 and reduce_node.inputs[2] is not None:
            raise NoMatch(f"{op} '{reduce_node.name}' has a bias", near=True)
    if eps is None:
        raise NoMatch("norm has no constant eps added to the mean square", near=True)
    for _, gain in gains:
        if not _stored(gain):
            raise NoMatch(f"norm gain '{gain.name}' is not an initializer", near=True)
    named = tuple((n, v.name or "") for n, v in gains)
    norm = Norm(x.name or "", z.name or "", nodes, eps, named, op)
    error = _norm_error(norm, x, z, {v for _, v in gains}, (dtype, z_dtype), ctx)
    if error > NORM_TOLERANCE.get(dtype, 1e-4):
        raise NoMatch(
            f"norm does not compute x / rms(x) (max relative error {error:.1e})", near=True
        )
    return norm


def _eps_after(mean: ir.Value, nodes: frozenset[ir.Node]) -> float | None:
    for node in readers(mean):
        if node in nodes and node.op_type == "Add":
            other = node.inputs[1] if node.inputs[0] is mean else node.inputs[0]
            return scalar(other)
    return None


def _norm_error(
    norm: Norm,
    x: ir.Value,
    z: ir.Value,
    gains: set[ir.Value],
    types: tuple[int, int],
    ctx: _Context,
) -> float:
    """Evaluate the island with γ = 1 on a probe and compare it with x / sqrt(mean(x²) + eps).

    Islands that compute the same thing up to value names share one evaluation. The probe is
    the island cut out of the graph (onnx_ir's ``extract``), its gains set to ones."""
    hidden = int(np.prod(constant_shape(next(iter(gains))))) if gains else 8  # type: ignore[arg-type]
    key = (_island_signature(norm.nodes, x, ctx.order), types[0], hidden, norm.eps)
    if key not in _NORM_ERRORS:
        island = ir.convenience.extract(ctx.graph, [x], [z])
        names = {g.name for g in gains}
        for value in island.initializers.values():
            if value.name in names:
                ones = np.ones_like(read(value.const_value))  # type: ignore[arg-type]
                value.const_value = ir.tensor(ones, name=value.name)
        (fed,), (out,) = island.inputs, island.outputs
        fed.dtype, out.dtype = ir.DataType(types[0]), ir.DataType(types[1])
        fed.shape = None  # the probe's width is its own
        for value in (v for node in island for v in node.outputs):
            value.shape = None
        probe = runnable(ir.Model(island, ir_version=10))
        _NORM_ERRORS[key] = _evaluate_norm(probe, fed.name or "", types[0], hidden, norm.eps)
    return _NORM_ERRORS[key]


# Bounded: one entry per distinct island spelling, and a model has a handful.
_NORM_ERRORS: dict[tuple, float] = {}


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run a small model in ONNX Runtime (optimisations off), or in ONNX's reference evaluator
    where ONNX Runtime's CPU kernels lack the dtype (bf16)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception:
        from onnx.reference import ReferenceEvaluator

        return list(ReferenceEvaluator(model).run(None, feeds))
    return list(session.run(None, feeds))


def _evaluate_norm(model: onnx.ModelProto, fed: str, x_type: int, hidden: int, eps: float) -> float:
    rng = np.random.default_rng(0)
    # Rows of very different scale: a missing sqrt, square or eps shows on one of them.
    x = (rng.standard_normal((1, 3, hidden)) * np.array([[[0.01], [1.0], [30.0]]])).astype(
        helper.tensor_dtype_to_np_dtype(x_type)
    )
    try:
        (z,) = _run(model, {fed: x})
    except Exception:  # an island no evaluator can run is not a norm we know
        return float("inf")
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps)
    z64 = np.asarray(z).astype(np.float64)
    if z64.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(z64 - expected) / np.max(np.abs(expected), axis=-1, keepdims=True)))


# -- the block ---------------------------------------------------------------------------------------


class _Context:
    """What matching needs of the graph beyond the values themselves."""

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.order = node_order(graph)
        self.outputs = frozenset(graph.outputs)


def match_block(ctx: _Context, add: ir.Node) -> FfnBlock:
    """The FFN block whose residual Add is ``add`` — else NoMatch with the reason."""
    if add.op_type != "Add" or len(add.inputs) != 2 or None in add.inputs:
        raise NoMatch("not an Add")
    failures: list[NoMatch] = []
    for x, branch in (add.inputs, reversed(add.inputs)):
        if is_constant(x):  # a bias Add, not a residual one
            continue
        try:
            return _match_from(ctx, add, x, branch)  # type: ignore[arg-type]
        except NoMatch as e:
            failures.append(e)
    raise max(failures, key=lambda e: e.near, default=NoMatch("no residual stream"))


def _match_from(ctx: _Context, add: ir.Node, x: ir.Value, branch: ir.Value) -> FfnBlock:
    down_out, down_casts = branch, []
    while (p := producer(down_out)) is not None and p.op_type in CASTS:
        down_casts.append(p)
        down_out = p.inputs[0]  # type: ignore[assignment]
    down = match_projection(down_out)
    product = producer(down.x, "Mul")
    if product is None:
        raise NoMatch("the down projection does not read a gated product")
    failures: list[NoMatch] = []
    for act_out, up_out in (product.inputs, reversed(product.inputs)):
        try:
            up = match_projection(up_out)  # type: ignore[arg-type]
        except NoMatch as e:
            failures.append(e)
            continue
        try:
            return _finish(ctx, add, x, down, down_casts, product, act_out, up)  # type: ignore[arg-type]
        except NoMatch as e:
            e.near = True
            failures.append(e)
    raise max(failures, key=lambda e: e.near)


def _finish(
    ctx: _Context,
    add: ir.Node,
    x: ir.Value,
    down: Projection,
    down_casts: list[ir.Node],
    product: ir.Node,
    act_out: ir.Value,
    up: Projection,
) -> FfnBlock:
    z = up.x

    def is_gate(v: ir.Value) -> bool:
        try:
            return match_projection(v).input == z.name
        except NoMatch:
            return False

    act_nodes, leaves = _island(act_out, is_gate, ELEMENTWISE)
    if len(leaves) != 1:
        raise NoMatch("the activation does not read exactly one gate projection")
    (gate_out,) = leaves
    gate = match_projection(gate_out)
    activation = _activation_name(act_nodes)
    if activation == "other" or not act_nodes:
        raise NoMatch("the gate activation is not SiLU or GELU")
    for value in (v for n in act_nodes for v in n.inputs if v is not None and is_constant(v)):
        if int(np.prod(constant_shape(value) or ())) != 1:
            raise NoMatch(f"the activation uses a non-scalar constant '{value.name}'")
    dtypes = {weight_dtype(ctx.graph.initializers, p.weight) for p in (gate, up, down)}
    if len(dtypes) != 1:
        raise NoMatch("the gate, up and down weights have different dtypes")
    (dtype,) = dtypes
    for role, proj in (("gate", gate), ("up", up), ("down", down)):
        if not proj.weight.constant:
            raise NoMatch(f"{role} weight '{proj.weight.name}' is not a constant initializer")
    norm = match_norm(z, x, elem_type(x) or dtype, dtype, ctx)  # type: ignore[arg-type]
    hidden, intermediate = gate.shape
    _bind_shapes(hidden, intermediate, norm, gate, up, down, ctx.graph.initializers)
    nodes = (
        norm.nodes | gate.nodes | up.nodes | act_nodes | down.nodes
        | frozenset({product, add, *down_casts})
    )  # fmt: skip
    _check_interior(ctx, nodes, keep=add.outputs[0])
    return FfnBlock(
        index=-1,
        residual_in=x.name or "",
        residual_out=add.outputs[0].name or "",
        residual_add=add,
        norm=norm,
        gate=gate,
        up=up,
        down=down,
        activation=activation,
        activation_nodes=act_nodes,
        activation_input=gate_out.name or "",
        activation_output=act_out.name or "",
        product=product,
        down_casts=tuple(down_casts),
        nodes=frozenset(nodes),
        hidden=hidden,
        intermediate=intermediate,
        dtype=dtype_name(dtype),
        signature=_island_signature(act_nodes, gate_out, ctx.order),
    )


def _bind_shapes(
    hidden: int,
    inter: int,
    norm: Norm,
    gate: Projection,
    up: Projection,
    down: Projection,
    initializers: Mapping[str, ir.Value],
) -> None:
    """Bind H and I across the weights; any disagreement is a refusal naming the culprit."""
    expected = {"up": (up, (hidden, inter)), "down": (down, (inter, hidden))}
    for role, (proj, shape) in expected.items():
        if proj.shape != shape:
            raise NoMatch(
                f"{role} weight is {proj.shape[0]}×{proj.shape[1]}, expected {shape[0]}×{shape[1]}"
                f" from the gate's H={hidden}, I={inter}"
            )
    for _, gain in norm.gains:
        size = int(np.prod(initializer(initializers, gain).shape))
        if size != hidden:
            raise NoMatch(f"norm gain '{gain}' has {size} elements, expected H={hidden}")


def _check_interior(ctx: _Context, nodes: frozenset[ir.Node], keep: ir.Value) -> None:
    """Reject a match whose interior values are read outside it or are graph outputs."""
    for node in sorted(nodes, key=ctx.order.__getitem__):
        for value in node.outputs:
            if value is keep or not value.name:
                continue
            if value in ctx.outputs:
                raise NoMatch(f"interior value '{value.name}' is a graph output", near=True)
            outside = [n for n in readers(value) if n not in nodes]
            if outside:
                raise NoMatch(
                    f"interior value '{value.name}' also feeds node {label(outside[0])}", near=True
                )


def find_blocks(
    model: ir.Model, *, all_misses: bool = False
) -> tuple[list[FfnBlock], list[NearMiss]]:
    """Every FFN block of the graph in graph order, and the refused near misses (with
    ``all_misses``, every Add of two computed values that was refused, with its reason)."""
    ctx = _Context(model.graph)
    blocks: list[FfnBlock] = []
    misses: list[NearMiss] = []
    for at, node in enumerate(model.graph):
        if node.op_type != "Add":
            continue
        try:
            block = match_block(ctx, node)
        except NoMatch as e:
            computed = sum(v is not None and not is_constant(v) for v in node.inputs) == 2
            if e.near or (all_misses and computed):
                name = node.name or node.outputs[0].name or ""
                misses.append(NearMiss(at, name, e.reason, e.near))
            continue
        blocks.append(_with_index(block, len(blocks)))
    return blocks, misses


def _with_index(block: FfnBlock, index: int) -> FfnBlock:
    from dataclasses import replace

    return replace(block, index=index)
