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

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper

from graphfuse.graph import ELEMENTWISE, NORM_OPS, GraphIndex, attribute

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


@dataclass(frozen=True)
class Weight:
    """A constant matrix or vector as stored, and how to read it as the math wants it."""

    name: str
    transposed: bool = False  # stored [out, in] (Transpose(W) or Gemm transB=1)
    columns: tuple[int, int] | None = None  # the output features this projection owns
    constant: bool = True  # False: computed at run time, so the block cannot be fused
    quant: Quant | None = None  # MatMulNBits packing, where the weight is quantised

    def load(self, g: GraphIndex) -> np.ndarray:
        """The matrix as [in, out] (a bias as [out]), in its stored dtype (a quantised weight
        dequantised to its scales' dtype)."""
        if self.quant is not None:
            from graphfuse.nbits import dequantize

            q = self.quant
            zero_points = g.constant(q.zero_points) if q.zero_points else None
            scales = g.constant(q.scales)
            assert scales is not None, q.scales
            return dequantize(g.constant(self.name), scales, zero_points, q).T
        array = g.constant(self.name)
        assert array is not None, self.name
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
    nodes: frozenset[int]


@dataclass(frozen=True)
class Norm:
    input: str  # X, the residual stream
    output: str  # z, read by the gate and up projections
    nodes: frozenset[int]
    eps: float
    gains: tuple[tuple[int, str], ...]  # (node, constant): γ is their product; none: γ = 1
    op: str  # ReduceMean | RMSNormalization | SimplifiedLayerNormalization


@dataclass(frozen=True)
class FfnBlock:
    """One gated FFN block with pre-norm and residual, as found in the graph."""

    index: int  # position among the blocks, in graph order
    residual_in: str
    residual_out: str
    residual_add: int
    norm: Norm
    gate: Projection
    up: Projection
    down: Projection
    activation: str
    activation_nodes: frozenset[int]
    activation_input: str  # the gate value the activation island reads
    activation_output: str
    product: int  # the Mul of activation and up
    down_casts: tuple[int, ...]  # Casts between the down projection and the residual Add
    nodes: frozenset[int]
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

    node: int
    name: str
    reason: str
    near: bool = True


def dtype_name(elem_type: int | None) -> str:
    if elem_type is None:
        return "unknown"
    return helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type != 16 else "bfloat16"


# -- projections ---------------------------------------------------------------------------------


def _bias(g: GraphIndex, value: str) -> tuple[str, str] | None:
    """``Add(v, b)`` with a constant vector b, either operand order: (v, b)."""
    node = g.producer_of(value)
    if node is None or node.op_type != "Add":
        return None
    for a, b in (node.input, reversed(node.input)):
        shape = g.shape_of_constant(b)
        if shape and all(d == 1 for d in shape[:-1]) and g.producer_of(a) is not None:
            return a, b
    return None


def _weight(g: GraphIndex, value: str, transposed: bool) -> tuple[Weight, list[int]]:
    """A constant weight, seen through one ``Transpose`` — else NoMatch."""
    node = g.producer_of(value)
    nodes = []
    if node is not None and node.op_type == "Transpose" and g.is_constant(node.input[0]):
        if list(attribute(node, "perm", [1, 0])) != [1, 0]:  # type: ignore[call-overload]
            raise NoMatch(f"weight transpose '{node.name}' is not a 2-D transpose")
        nodes.append(g.producer[value])
        value, transposed = node.input[0], not transposed
    if not g.is_constant(value):
        return Weight(value, transposed, constant=False), nodes
    if len(g.shape_of_constant(value) or ()) != 2:
        raise NoMatch(f"weight '{value}' is not a matrix")
    return Weight(value, transposed), nodes


def match_projection(g: GraphIndex, value: str) -> Projection:
    """The projection producing ``value`` (see the module docstring for its forms)."""
    nodes: list[int] = []
    columns: tuple[int, int] | None = None
    biases: list[str] = []
    v = value

    def take(n: int) -> onnx.NodeProto:
        nodes.append(n)
        return g.node(n)

    if (found := _bias(g, v)) is not None:
        nodes.append(g.producer[v])
        v, b = found
        biases.append(b)
    packed = g.producer_of(v)
    if packed is not None and packed.op_type in ("Split", "Slice"):
        columns = _packed_columns(g, g.producer[v], v)
        take(g.producer[v])
        v = packed.input[0]
        if (found := _bias(g, v)) is not None:
            nodes.append(g.producer[v])
            v, b = found
            biases.append(b)
    reshaped = g.producer_of(v)
    flattened = reshaped is not None and reshaped.op_type == "Reshape"
    if flattened:
        take(g.producer[v])
        v = reshaped.input[0]  # type: ignore[union-attr]
        if (found := _bias(g, v)) is not None:
            nodes.append(g.producer[v])
            v, b = found
            biases.append(b)
    core_at = g.producer.get(v)
    if core_at is None:
        raise NoMatch(f"'{value}' is not computed by a projection")
    core = take(core_at)
    if core.op_type == "MatMul":
        weight, extra = _weight(g, core.input[1], transposed=False)
    elif core.op_type == "Gemm":
        if attribute(core, "transA", 0) or attribute(core, "alpha", 1.0) != 1.0:
            raise NoMatch(f"Gemm '{core.name}' scales or transposes its input")
        weight, extra = _weight(g, core.input[1], transposed=bool(attribute(core, "transB", 0)))
        if len(core.input) > 2 and core.input[2]:
            if attribute(core, "beta", 1.0) != 1.0:
                raise NoMatch(f"Gemm '{core.name}' scales its bias")
            biases.append(core.input[2])
    elif core.op_type == "MatMulNBits" and core.domain == "com.microsoft":
        weight, bias_input = _nbits_weight(g, core)
        if bias_input:
            biases.append(bias_input)
        extra = []
    else:
        raise NoMatch(f"'{value}' is computed by {core.op_type}, not MatMul or Gemm")
    nodes.extend(extra)
    x = core.input[0]
    if flattened:
        inner = g.producer_of(x)
        if inner is None or inner.op_type != "Reshape":
            raise NoMatch(f"projection '{core.name}' reshapes its output but not its input")
        take(g.producer[x])
        x = inner.input[0]
    if weight.quant is not None:
        rows, cols = weight.quant.k, weight.quant.n
    else:
        rows, cols = g.shape_of_constant(weight.name) or (-1, -1)
    fan_in, fan_out = (cols, rows) if weight.transposed else (rows, cols)
    if columns is not None:
        if weight.quant is not None:
            raise NoMatch(f"packed gate/up '{core.name}' is quantised: not supported")
        weight = Weight(weight.name, weight.transposed, columns, weight.constant)
        fan_out = columns[1] - columns[0]
    if len(biases) > 1:
        raise NoMatch(f"projection '{core.name}' has more than one bias")
    bias = None
    if biases:
        full = g.shape_of_constant(biases[0])[-1]  # type: ignore[index]
        bias_columns = columns if columns is not None and full != fan_out else None
        bias = Weight(biases[0], columns=bias_columns)
    return Projection(x, value, weight, bias, (fan_in, fan_out), frozenset(nodes))


def _nbits_weight(g: GraphIndex, node: onnx.NodeProto) -> tuple[Weight, str | None]:
    """The quantised weight of a ``MatMulNBits`` node and its bias input, if any."""
    inputs = [*node.input, "", "", "", ""]
    b, scales, zero_points, g_idx, bias = inputs[1:6]
    if g_idx:
        raise NoMatch(
            f"MatMulNBits '{node.name}' has a g_idx input (act-order): its rows are permuted, "
            "which graphfuse does not fuse"
        )
    for v in (b, scales, zero_points):
        if v and not g.is_constant(v):
            return Weight(v, constant=False), None
    quant = Quant(
        scales=scales,
        zero_points=zero_points or None,
        bits=int(attribute(node, "bits", 4)),  # type: ignore[call-overload]
        block_size=int(attribute(node, "block_size", 0)),  # type: ignore[call-overload]
        accuracy_level=int(attribute(node, "accuracy_level", 0)),  # type: ignore[call-overload]
        k=int(attribute(node, "K", 0)),  # type: ignore[call-overload]
        n=int(attribute(node, "N", 0)),  # type: ignore[call-overload]
    )
    return Weight(b, quant=quant), bias or None


def weight_dtype(g: GraphIndex, weight: Weight) -> int | None:
    """The element type a projection computes in: the stored weight's, or a quantised
    weight's scales'."""
    return g.elem_type(weight.quant.scales if weight.quant else weight.name)


def _packed_columns(g: GraphIndex, at: int, value: str) -> tuple[int, int]:
    """Which output features of a packed gate/up product a Split or Slice output holds."""
    node = g.node(at)
    source_shape = _matmul_out_features(g, node.input[0])
    if node.op_type == "Split":
        axis = int(attribute(node, "axis", 0))  # type: ignore[call-overload]
        if axis not in (-1, _rank(g, node.input[0]) - 1):
            raise NoMatch(f"Split '{node.name}' is not along the feature axis")
        k = list(node.output).index(value)
        sizes: list[int]
        if len(node.input) > 1 and node.input[1]:
            given = g.constant(node.input[1])
            if given is None:
                raise NoMatch(f"Split '{node.name}' has sizes that are not constant")
            sizes = [int(s) for s in given]
        elif attribute(node, "split") is not None:
            sizes = list(attribute(node, "split"))  # type: ignore[call-overload]
        else:
            sizes = [source_shape // len(node.output)] * len(node.output)
        start = sum(sizes[:k])
        return start, start + sizes[k]
    # Slice(data, starts, ends, axes, steps)
    parts = [g.constant(v) if v else None for v in node.input[1:5]]
    if any(p is None for p in parts[:2]) or (len(parts) > 2 and parts[2] is None):
        raise NoMatch(f"Slice '{node.name}' has bounds that are not constant")
    starts, ends = int(parts[0][0]), int(parts[1][0])  # type: ignore[index]
    axes = int(parts[2][0]) if len(parts) > 2 else 0  # type: ignore[index]
    steps = int(parts[3][0]) if len(parts) > 3 and parts[3] is not None else 1
    if axes not in (-1, _rank(g, node.input[0]) - 1) or steps != 1:
        raise NoMatch(f"Slice '{node.name}' is not a contiguous feature slice")
    starts = starts + source_shape if starts < 0 else starts
    ends = ends + source_shape if ends < 0 else ends
    return max(0, starts), min(source_shape, ends)


def _matmul_out_features(g: GraphIndex, value: str) -> int:
    return match_projection(g, value).shape[1]


def _rank(g: GraphIndex, value: str) -> int:
    t = g._types.get(value)
    if t is not None and t.tensor_type.HasField("shape"):
        return len(t.tensor_type.shape.dim)
    return -99  # unknown: only the -1 spelling of the last axis is accepted


# -- islands -------------------------------------------------------------------------------------


def _island(
    g: GraphIndex, output: str, is_leaf, allowed: frozenset[str]
) -> tuple[frozenset[int], set[str]]:
    """Nodes between ``output`` and the values where ``is_leaf`` holds, walking producers."""
    nodes: set[int] = set()
    leaves: set[str] = set()
    stack = [output]
    seen: set[str] = set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if is_leaf(v):
            leaves.add(v)
            continue
        if g.is_constant(v):
            continue
        at = g.producer.get(v)
        if at is None:
            raise NoMatch(f"'{v}' comes from outside the block (a graph input)")
        node = g.node(at)
        if node.op_type not in allowed:
            raise NoMatch(f"{node.op_type} '{node.name}' is not part of a gated FFN")
        nodes.add(at)
        stack.extend(i for i in node.input if i)
    return frozenset(nodes), leaves


def _activation_name(g: GraphIndex, nodes: frozenset[int]) -> str:
    ops = {g.node(i).op_type for i in nodes}
    if "Gelu" in ops:
        node = next(g.node(i) for i in nodes if g.node(i).op_type == "Gelu")
        return (
            "gelu_tanh" if attribute(node, "approximate", b"none") in (b"tanh", "tanh") else "gelu"
        )
    if "Tanh" in ops:
        return "gelu_tanh"
    if "Erf" in ops:
        return "gelu"
    if "Swish" in ops or "Sigmoid" in ops:
        return "silu"
    return "other"


def _island_signature(g: GraphIndex, nodes: frozenset[int], entry: str) -> tuple:
    """What an island computes, up to value names: ops, attributes, constants, wiring."""
    names = {entry: "in"}
    rows: list[tuple] = []
    for i in sorted(nodes):
        node = g.node(i)
        ins = []
        for v in node.input:
            if v in names:
                ins.append(names[v])
            elif g.is_constant(v):
                shape = g.shape_of_constant(v) or ()
                ins.append(repr(g.scalar(v)) if int(np.prod(shape)) == 1 else f"const{shape}")
            else:
                ins.append(v)
        for k, v in enumerate(node.output):
            names[v] = f"{len(rows)}.{k}"
        attrs = sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute)
        rows.append((node.op_type, tuple(ins), tuple(attrs)))
    return tuple(rows)


# -- the norm --------------------------------------------------------------------------------------


# How far an island may stray from x / rms(x) and still be that: float rounding of the island's
# own dtype over ~6 ops (fp16 and bf16 round at 2^-11 and 2^-8).
NORM_TOLERANCE: dict[int, float] = {onnx.TensorProto.FLOAT16: 1e-2, onnx.TensorProto.BFLOAT16: 5e-2}


def match_norm(g: GraphIndex, z: str, x: str, dtype: int, z_dtype: int) -> Norm:
    """The RMSNorm island between the residual stream ``x`` and the projections' input ``z``;
    ``dtype`` and ``z_dtype`` are their element types."""
    nodes, leaves = _island(g, z, lambda v: v == x, ELEMENTWISE | NORM_OPS)
    if leaves != {x}:
        raise NoMatch("the projections do not read the normalised residual stream", near=True)
    reductions = [i for i in nodes if g.node(i).op_type in NORM_OPS]
    if len(reductions) != 1:
        raise NoMatch(f"norm has {len(reductions)} normalisations, not one", near=True)
    reduce_node = g.node(reductions[0])
    op = reduce_node.op_type
    # The gains: per-channel constants that multiply, and a norm op's scale input.
    gains = [
        (i, v)
        for i in sorted(nodes)
        for v in g.node(i).input
        if g.node(i).op_type == "Mul" and (g.shape_of_constant(v) or (1,))[-1] > 1
    ]
    if op == "ReduceMean":
        eps = _eps_after(g, reduce_node.output[0], nodes)
    else:
        eps = float(attribute(reduce_node, "epsilon", 1e-5))  # type: ignore[arg-type]
        if attribute(reduce_node, "axis", -1) not in (-1, _rank(g, reduce_node.input[0]) - 1):
            raise NoMatch(f"{op} '{reduce_node.name}' does not normalise the last axis", near=True)
        if len(reduce_node.input) > 1 and reduce_node.input[1]:
            if not g.is_constant(reduce_node.input[1]):
                raise NoMatch(f"{op} scale '{reduce_node.input[1]}' is not constant", near=True)
            gains.append((reductions[0], reduce_node.input[1]))
        if len(reduce_node.input) > 2 and reduce_node.input[2]:
            raise NoMatch(f"{op} '{reduce_node.name}' has a bias", near=True)
    if eps is None:
        raise NoMatch("norm has no constant eps added to the mean square", near=True)
    norm = Norm(x, z, nodes, eps, tuple(gains), op)
    error = _norm_error(g, norm, dtype, z_dtype)
    if error > NORM_TOLERANCE.get(dtype, 1e-4):
        raise NoMatch(
            f"norm does not compute x / rms(x) (max relative error {error:.1e})", near=True
        )
    return norm


def _eps_after(g: GraphIndex, mean: str, nodes: frozenset[int]) -> float | None:
    for i in g.users(mean):
        node = g.node(i)
        if i in nodes and node.op_type == "Add":
            other = node.input[1] if node.input[0] == mean else node.input[0]
            return g.scalar(other)
    return None


def _norm_error(g: GraphIndex, norm: Norm, x_type: int, z_type: int) -> float:
    """Evaluate the island with γ = 1 on a probe and compare it with x / sqrt(mean(x²) + eps).

    Islands that compute the same thing up to value names share one evaluation."""
    hidden = int(np.prod(g.shape_of_constant(norm.gains[0][1]))) if norm.gains else 8  # type: ignore[arg-type]
    key = (_island_signature(g, norm.nodes, norm.input), x_type, hidden, norm.eps)
    if key not in _NORM_ERRORS:
        _NORM_ERRORS[key] = _evaluate_norm(
            _island_model(g, norm, x_type, z_type), x_type, hidden, norm.eps
        )
    return _NORM_ERRORS[key]


_NORM_ERRORS: dict[tuple, float] = {}


def _island_model(g: GraphIndex, norm: Norm, x_type: int, z_type: int) -> onnx.ModelProto:
    """The norm island as a standalone model with input "x" and its gain replaced by ones."""
    nodes = [onnx.NodeProto() for _ in norm.nodes]
    for copy, i in zip(nodes, sorted(norm.nodes), strict=True):
        copy.CopyFrom(g.node(i))
        copy.input[:] = ["x" if v == norm.input else v for v in copy.input]
    gains = {v for _, v in norm.gains}
    inits = []
    for v in {v for n in nodes for v in n.input if v and g.is_constant(v)}:
        array = np.asarray(g.constant(v))
        inits.append(onnx.numpy_helper.from_array(np.ones_like(array) if v in gains else array, v))
    graph = helper.make_graph(
        nodes,
        "norm_probe",
        [helper.make_tensor_value_info("x", x_type, None)],
        [helper.make_tensor_value_info(norm.output, z_type, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=list(g.model.opset_import), ir_version=10)


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


def _evaluate_norm(model: onnx.ModelProto, x_type: int, hidden: int, eps: float) -> float:
    rng = np.random.default_rng(0)
    # Rows of very different scale: a missing sqrt, square or eps shows on one of them.
    x = (rng.standard_normal((1, 3, hidden)) * np.array([[[0.01], [1.0], [30.0]]])).astype(
        helper.tensor_dtype_to_np_dtype(x_type)
    )
    try:
        (z,) = _run(model, {"x": x})
    except Exception:  # an island no evaluator can run is not a norm we know
        return float("inf")
    x64 = x.astype(np.float64)
    expected = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + eps)
    z64 = np.asarray(z).astype(np.float64)
    if z64.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(z64 - expected) / np.max(np.abs(expected), axis=-1, keepdims=True)))


# -- the block ---------------------------------------------------------------------------------------


def match_block(g: GraphIndex, add_at: int) -> FfnBlock:
    """The FFN block whose residual Add is node ``add_at`` — else NoMatch with the reason."""
    add = g.node(add_at)
    if add.op_type != "Add" or len(add.input) != 2:
        raise NoMatch("not an Add")
    failures: list[NoMatch] = []
    for x, branch in (add.input, reversed(add.input)):
        if g.is_constant(x):  # a bias Add, not a residual one
            continue
        try:
            return _match_from(g, add_at, x, branch)
        except NoMatch as e:
            failures.append(e)
    raise max(failures, key=lambda e: e.near, default=NoMatch("no residual stream"))


def _match_from(g: GraphIndex, add_at: int, x: str, branch: str) -> FfnBlock:
    down_out, down_casts = branch, []
    while (p := g.producer.get(down_out)) is not None and g.node(p).op_type in CASTS:
        down_casts.append(p)
        down_out = g.node(p).input[0]
    down = match_projection(g, down_out)
    product_at = g.producer.get(down.input)
    if product_at is None or g.node(product_at).op_type != "Mul":
        raise NoMatch("the down projection does not read a gated product")
    product = g.node(product_at)
    failures: list[NoMatch] = []
    for act_out, up_out in (product.input, reversed(product.input)):
        try:
            up = match_projection(g, up_out)
        except NoMatch as e:
            failures.append(e)
            continue
        try:
            return _finish(g, add_at, x, down, down_casts, product_at, act_out, up)
        except NoMatch as e:
            e.near = True
            failures.append(e)
    raise max(failures, key=lambda e: e.near)


def _finish(
    g: GraphIndex,
    add_at: int,
    x: str,
    down: Projection,
    down_casts: list[int],
    product_at: int,
    act_out: str,
    up: Projection,
) -> FfnBlock:
    z = up.input

    def is_gate(v: str) -> bool:
        try:
            return match_projection(g, v).input == z
        except NoMatch:
            return False

    act_nodes, leaves = _island(g, act_out, is_gate, ELEMENTWISE)
    if len(leaves) != 1:
        raise NoMatch("the activation does not read exactly one gate projection")
    (gate_out,) = leaves
    gate = match_projection(g, gate_out)
    activation = _activation_name(g, act_nodes)
    if activation == "other" or not act_nodes:
        raise NoMatch("the gate activation is not SiLU or GELU")
    for value in (v for i in act_nodes for v in g.node(i).input if g.is_constant(v)):
        if int(np.prod(g.shape_of_constant(value) or ())) != 1:
            raise NoMatch(f"the activation uses a non-scalar constant '{value}'")
    dtypes = {weight_dtype(g, p.weight) for p in (gate, up, down)}
    if len(dtypes) != 1:
        raise NoMatch("the gate, up and down weights have different dtypes")
    (dtype,) = dtypes
    for role, proj in (("gate", gate), ("up", up), ("down", down)):
        if not proj.weight.constant:
            raise NoMatch(f"{role} weight '{proj.weight.name}' is not a constant initializer")
    norm = match_norm(g, z, x, g.elem_type(x) or dtype, dtype)  # type: ignore[arg-type]
    hidden, intermediate = gate.shape
    _bind_shapes(hidden, intermediate, norm, gate, up, down, g)
    nodes = (
        norm.nodes | gate.nodes | up.nodes | act_nodes | down.nodes
        | {product_at, add_at, *down_casts}
    )  # fmt: skip
    add = g.node(add_at)
    _check_interior(g, nodes, keep=add.output[0])
    return FfnBlock(
        index=-1,
        residual_in=x,
        residual_out=add.output[0],
        residual_add=add_at,
        norm=norm,
        gate=gate,
        up=up,
        down=down,
        activation=activation,
        activation_nodes=act_nodes,
        activation_input=gate_out,
        activation_output=act_out,
        product=product_at,
        down_casts=tuple(down_casts),
        nodes=frozenset(nodes),
        hidden=hidden,
        intermediate=intermediate,
        dtype=dtype_name(dtype),
        signature=_island_signature(g, act_nodes, gate_out),
    )


def _bind_shapes(
    hidden: int,
    inter: int,
    norm: Norm,
    gate: Projection,
    up: Projection,
    down: Projection,
    g: GraphIndex,
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
        size = int(np.prod(g.shape_of_constant(gain)))  # type: ignore[arg-type]
        if size != hidden:
            raise NoMatch(f"norm gain '{gain}' has {size} elements, expected H={hidden}")


def _check_interior(g: GraphIndex, nodes: set[int] | frozenset[int], keep: str) -> None:
    """Reject a match whose interior values are read outside it or are graph outputs."""
    for i in sorted(nodes):
        for value in g.node(i).output:
            if value == keep or not value:
                continue
            if value in g.graph_outputs:
                raise NoMatch(f"interior value '{value}' is a graph output", near=True)
            outside = [j for j in g.users(value) if j not in nodes]
            if outside:
                raise NoMatch(
                    f"interior value '{value}' also feeds node {g.label(outside[0])}", near=True
                )


def find_blocks(
    g: GraphIndex, *, all_misses: bool = False
) -> tuple[list[FfnBlock], list[NearMiss]]:
    """Every FFN block of the graph in graph order, and the refused near misses (with
    ``all_misses``, every Add of two computed values that was refused, with its reason)."""
    blocks: list[FfnBlock] = []
    misses: list[NearMiss] = []
    for at, node in enumerate(g.nodes):
        if node.op_type != "Add":
            continue
        try:
            block = match_block(g, at)
        except NoMatch as e:
            computed = sum(not g.is_constant(v) for v in node.input) == 2
            if e.near or (all_misses and computed):
                misses.append(NearMiss(at, node.name or node.output[0], e.reason, e.near))
            continue
        blocks.append(_with_index(block, len(blocks)))
    return blocks, misses


def _with_index(block: FfnBlock, index: int) -> FfnBlock:
    from dataclasses import replace

    return replace(block, index=index)
