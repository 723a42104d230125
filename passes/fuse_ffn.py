"""FFN Fusion: rewrite each run of consecutive gated FFN blocks into one wide FFN.

Before (k blocks, each reading the previous one's output)::

    X ─ n₁ ─ FFN₁ ─(+)─ n₂ ─ FFN₂ ─(+)─ … ─ nₖ ─ FFNₖ ─(+)─ Y

After (one norm, one wide FFN, one residual Add)::

    X ─ n̂ ─ MatMul[W1₁γ₁|…|W1ₖγₖ] ─ act ─┐
         └─ MatMul[W3₁γ₁|…|W3ₖγₖ] ──────  Mul ─ MatMul[W2₁;…;W2ₖ] ─(+)─ Y
    X ────────────────────────────────────────────────────────────┘

With a linear stand-in (``linear``, the heal that also replaces removed attention), the down
projection reads [h, n̂(X)]: the wide hidden activations and the run's normalised input, H more
columns, so a refit can learn a linear map of the input as well (still one stage)::

    … Mul ─ Concat(h, n̂) ─ MatMul[W2₁;…;W2ₖ; L] ─(+)─ Y        L = 0 until refitted

n̂ is block 1's norm island with its gain removed (x / rms(x) is the same for every block, given
one eps), each γᵢ is folded into the rows of the gate and up weights, gate and up weights are
concatenated along the output features and down weights along the input features, gate and up
biases concatenate and down biases add. So the result is *exactly* Y = X + Σᵢ FFNᵢ(nᵢ(X)) up to
float rounding; that this approximates the sequential chain is the method's bet, measured
elsewhere, never assumed here.

Requires: blocks from `graphfuse.blocks.find_blocks` forming runs accepted by
`graphfuse.runs.find_runs` (same eps, activation, dtype, H; interior values used nowhere else).
Ensures: graph inputs and outputs keep their names, types and shapes; nodes and initializers
outside the runs are untouched; new nodes are named ``graphfuse/ffn<a>-<b>/…`` and tagged in
their doc_string; nodes and initializers no output depends on are removed (onnx_ir's
`RemoveUnusedNodesPass`: those the rewrite left dead, and any the input already had); order stays topological (the new nodes take the place of the run's
last residual Add). New float weights are ``ir.LazyTensor``s: made when they are written, so a
model saved to a file holds one run's weights in memory at a time, not all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

from graphfuse import ir as irs
from graphfuse.blocks import FfnBlock, Weight, initializer
from graphfuse.errors import GraphfuseError
from graphfuse.nbits import dequantize, join_along_k, quantize, unpack

RULE = "graphfuse.fuse_ffn"

Weights = Mapping[str, ir.Value]  # the input's initializers, by name


@dataclass(frozen=True)
class FusedRun:
    first: int
    last: int
    hidden: int
    width: int  # Σ Iᵢ
    output: str  # the value the fused residual Add writes (the run's original output)


class FuseFfn(irs.Pass):
    """Fuse every run in ``runs`` (blocks found in the model the pass is given); the report is
    the list of `FusedRun`.

    ``pack``: gate and up as one MatMul followed by Split (else two MatMuls). ``downs``: float32
    [ΣI, H] down projections to use instead of the join, by (first, last) block (a repair's
    refit, from a plan); quantised projections are requantised by onnxruntime's quantiser.
    ``requantize``: quantised gate/up weights are dequantised, γ-folded, concatenated and
    requantised (one shared norm, one gate and one up MatMulNBits: faster, not exact) instead
    of kept per branch (exact). ``linear``: runs, by (first, last) block, whose down projection
    also reads the normalised run input (its ``downs`` entry is then [ΣI + H, H]; without one,
    those H rows are zeros). ``progress``: a tqdm bar, advanced by each run's blocks."""

    def __init__(
        self,
        runs: list[list[FfnBlock]],
        *,
        pack: bool = False,
        downs: dict[tuple[int, int], np.ndarray] | None = None,
        requantize: bool = False,
        linear: Collection[tuple[int, int]] = (),
        progress=None,
    ) -> None:
        super().__init__()
        self.runs, self.pack, self.downs = runs, pack, downs or {}
        self.requantize, self.linear, self.progress = requantize, linear, progress

    def call(self, model: ir.Model) -> irs.Result:
        graph = model.graph
        weights = dict(graph.initializers)  # still readable once the run's own are removed
        named = irs.values(graph)
        order = irs.order(graph)
        fused: list[FusedRun] = []
        for run in self.runs:
            key = (run[0].index, run[-1].index)
            _Run(graph, weights, named, order, run).fuse(
                self.pack, self.downs.get(key), self.requantize, key in self.linear
            )
            fused.append(
                FusedRun(run[0].index, run[-1].index, run[0].hidden,
                         sum(b.intermediate for b in run), run[-1].residual_out)
            )  # fmt: skip
            if self.progress is not None:
                self.progress.update(len(run))
        if fused:
            irs.remove_dead(model)
        return irs.Result(model, modified=bool(fused), report=fused)


# -- one run ---------------------------------------------------------------------------------------


class _Run:
    """The new nodes and weights of one fused run, made in graph order."""

    def __init__(
        self,
        graph: ir.Graph,
        weights: Weights,
        named: dict[str, ir.Value],
        order: dict[ir.Node, int],
        run: list[FfnBlock],
    ) -> None:
        self.graph, self.weights, self.named, self.order, self.run = (
            graph,
            weights,
            named,
            order,
            run,
        )
        first, last = run[0], run[-1]
        self.prefix = _fresh(f"graphfuse/ffn{first.index}-{last.index}", graph)
        self.doc = f"{RULE}: FFN blocks {first.index}-{last.index} as one wide FFN"
        self.nodes: list[ir.Node] = []
        self.x = named[first.residual_in]

    def emit(self, op: str, inputs: Sequence[ir.Value | None], output: str, **attrs) -> ir.Value:
        domain = attrs.pop("domain", "")
        name = f"{self.prefix}/{output}"
        node = ir.node(op, inputs, attrs, domain=domain, name=name, doc_string=self.doc)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, name: str, array: np.ndarray | Callable[[], np.ndarray], dtype=None,
                 shape=None) -> ir.Value:  # fmt: skip
        """A new initializer ``prefix/name``: an array, or a function making it when written
        (``dtype`` and ``shape`` then say what it makes)."""
        full = f"{self.prefix}/{name}"
        if callable(array):
            make = array
            tensor: ir.TensorProtocol = ir.LazyTensor(
                lambda: ir.tensor(np.ascontiguousarray(make())),
                dtype=ir.DataType.from_numpy(np.dtype(dtype)),
                shape=ir.Shape(shape),
                name=full,
            )
        else:
            tensor = ir.tensor(np.ascontiguousarray(array), name=full)
        value = ir.Value(name=full, const_value=tensor, shape=ir.Shape(tensor.shape.numpy()),
                         type=ir.TensorType(tensor.dtype))  # fmt: skip
        self.graph.register_initializer(value)
        return value

    def copy(self, nodes, names: dict[ir.Value, ir.Value], prefix: str,
             skip: Mapping[ir.Node, ir.Value] = {}) -> None:  # fmt: skip
        """Copy ``nodes`` in graph order, reading ``names[v]`` for each value v they read that
        is in ``names``; ``skip`` maps a node left out to the value that stands for its output."""
        for node in sorted(nodes, key=self.order.__getitem__):
            if node in skip:
                names[node.outputs[0]] = skip[node]
                continue
            inputs = [v if v is None else names.get(v, v) for v in node.inputs]
            copy = irs.copy_node(node, inputs, prefix, self.doc)
            names.update(zip(node.outputs, copy.outputs, strict=True))
            self.nodes.append(copy)

    def unit_norm(self, names: dict[ir.Value, ir.Value]) -> ir.Value:
        """n̂: block 1's norm with its gains removed (a gain Mul is skipped; a norm op's scale
        becomes ones)."""
        norm = self.run[0].norm
        skip = {}
        for node, gain in norm.gains:
            if node.op_type == "Mul":
                skip[node] = next(v for v in node.inputs if v is not None and v.name != gain)
            else:
                stored = self.weights[gain].const_value
                assert stored is not None
                ones = np.ones(stored.shape.numpy(), stored.dtype.numpy())
                names[self.weights[gain]] = self.constant("unit_gain", ones)
        self.copy(norm.nodes, names, self.prefix, skip)
        return names[self.named[norm.output]]

    def fuse(self, pack: bool, down: np.ndarray | None, requantize: bool, linear: bool) -> None:
        run, first, last = self.run, self.run[0], self.run[-1]
        width = sum(b.intermediate for b in run) + (first.hidden if linear else 0)
        if down is not None and down.shape != (width, first.hidden):
            raise GraphfuseError(
                f"the down projection given for blocks {first.index}-{last.index} is "
                f"{list(down.shape)}, not [{width}, {first.hidden}]: it was made for another model"
            )
        names: dict[ir.Value, ir.Value] = {}
        quantised = any(p.weight.quant for b in run for p in (b.gate, b.up, b.down))
        if quantised and not requantize:
            extra = [self.unit_norm(names)] if linear else []
            y = self.per_branch_ffn(down, extra)
        else:
            y = self.wide_ffn(self.unit_norm(names), names, pack, down, linear)
        for cast in reversed(last.down_casts):
            inputs: list[ir.Value | None] = [y, *cast.inputs[1:]]
            if cast.op_type == "CastLike" and cast.inputs[1] is self.named[last.residual_in]:
                inputs[1] = self.x  # same stream, same type; the other is gone
            y = irs.copy_node(cast, inputs, self.prefix, self.doc).outputs[0]
            self.nodes.append(y.producer())  # type: ignore[arg-type]
        add = last.residual_add
        inputs = [self.x, y] if add.inputs[0] is self.named[last.residual_in] else [y, self.x]
        out = self.emit("Add", inputs, "residual")
        ir.convenience.replace_nodes_and_values(
            self.graph, add, [add], self.nodes, [add.outputs[0]], [out]
        )
        self.named[last.residual_out] = out  # the next run may start here

    def wide_ffn(self, z: ir.Value, names: dict[ir.Value, ir.Value], pack: bool,
                 down: np.ndarray | None, linear: bool) -> ir.Value:  # fmt: skip
        """One norm, one wide gate/up (γ folded in), one joined down."""
        run, first = self.run, self.run[0]
        quant = first.gate.weight.quant
        dtype = _np_dtype(self.weights, first.gate.weight)
        hidden, width = first.hidden, sum(b.intermediate for b in run)
        biases = _wide_biases(self.weights, run, dtype)
        if pack and ("gate" in biases or "up" in biases):
            zeros = np.zeros(width, dtype)
            biases["gate_up"] = np.concatenate([biases.pop("gate", zeros), biases.pop("up", zeros)])

        def wide(role: str) -> np.ndarray:
            if role == "gate_up":
                return np.concatenate([wide("gate"), wide("up")], axis=1)
            return _wide_weight(self.weights, run, role, dtype)

        def project(role: str) -> ir.Value:
            n = 2 * width if role == "gate_up" else width
            if quant is None:
                w = self.constant(f"{role}_weight", lambda: wide(role), dtype, (hidden, n))
                y = self.emit("MatMul", [z, w], f"{role}_matmul")
            else:
                layout = replace(quant, k=hidden, n=n)
                packed, scales, zp = quantize(wide(role), layout,
                                              zero_points=quant.zero_points is not None,
                                              scales_dtype=dtype)  # fmt: skip
                inputs = [z, self.constant(f"{role}_weight", packed),
                          self.constant(f"{role}_scales", scales)]  # fmt: skip
                if zp is not None:
                    inputs.append(self.constant(f"{role}_zero_points", zp))
                y = self.emit("MatMulNBits", inputs, f"{role}_matmul", domain="com.microsoft",
                              K=hidden, N=n, bits=quant.bits, block_size=quant.block_size,
                              accuracy_level=quant.accuracy_level)  # fmt: skip
            if role in biases:
                bias = self.constant(f"{role}_bias", biases[role])
                y = self.emit("Add", [y, bias], f"{role}_bias_add")
            return y

        if pack:
            sizes = self.constant("split_sizes", np.array([width, width], np.int64))
            split = ir.node("Split", [project("gate_up"), sizes], {"axis": -1}, num_outputs=2,
                            name=f"{self.prefix}/split", doc_string=self.doc)  # fmt: skip
            gate, up = split.outputs
            gate.name, up.name = f"{self.prefix}/gate", f"{self.prefix}/up"
            self.nodes.append(split)
        else:
            gate, up = project("gate"), project("up")
        names[self.named[first.activation_input]] = gate
        self.copy(first.activation_nodes, names, self.prefix)
        product = self.emit("Mul", [names[self.named[first.activation_output]], up], "product")
        if linear:
            product = self.emit("Concat", [product, z], "products", axis=-1)
        return self.joined_down(product, down, linear)

    def per_branch_ffn(self, down: np.ndarray | None = None, extra: Sequence[ir.Value] = ()
                       ) -> ir.Value:  # fmt: skip
        """The exact form for quantised weights: per-branch norm and gate/up, one joined down
        (``extra``: more features for it, the linear stand-in's n̂).

            X ─┬─ n₁ ─ gate₁/up₁ ─ act ─ Mul ─┐
               ├─ …                            Concat ─ MatMulNBits[W2₁; …; W2ₖ] ─ y
               └─ nₖ ─ gateₖ/upₖ ─ act ─ Mul ─┘

        A block's γ cannot be folded into blockwise-quantised gate/up weights exactly (a scale
        is shared by block_size inputs, γ differs per input), so each branch keeps its own norm
        (a copy of block i's norm island on the run's input X: nᵢ(X), as the parallel reference
        has it) and its own quantised gate and up. Re-spelling the norm as one shared x/rms(x)
        and a Mul by γᵢ would round differently by an ulp, and MatMulNBits' int8 quantisation
        of its input (accuracy_level 4) turns an ulp into a quantisation step. The down
        projections join along K in the packed domain (`graphfuse.nbits.join_along_k`): exact
        when every Iᵢ is a multiple of block_size, which the run finder checked, since the
        joined input is quantised in the same blocks of K as the parts."""
        products = []
        for i, block in enumerate(self.run):
            names = {self.named[block.residual_in]: self.x}
            inner = block.norm.nodes | block.gate.nodes | block.up.nodes | block.activation_nodes
            self.copy(inner | {block.product}, names, f"{self.prefix}/branch{i}")
            products.append(names[block.product.outputs[0]])
        joined = self.emit("Concat", [*products, *extra], "products", axis=-1)
        return self.joined_down(joined, down, bool(extra))

    def joined_down(self, x: ir.Value, refit: np.ndarray | None = None, linear: bool = False
                    ) -> ir.Value:  # fmt: skip
        """One down projection over the joined hidden features: [W2₁; …; W2ₖ], biases summed;
        ``refit`` (float32 [ΣI, H], or [ΣI + H, H] with ``linear``) instead of the join when
        given, requantised if quantised. ``linear`` without a refit: the join and H zero rows."""
        run, weights = self.run, self.weights
        first = run[0].down.weight
        hidden = run[0].hidden
        k = sum(b.intermediate for b in run) + (hidden if linear else 0)
        dtype = _np_dtype(weights, first)
        if first.quant is None:

            def down() -> np.ndarray:
                if refit is not None:
                    return refit.astype(dtype)
                joined = [b.down.weight.load(weights) for b in run]
                if linear:
                    joined.append(np.zeros((hidden, hidden), dtype))
                return np.concatenate(joined, axis=0)

            w = self.constant("down_weight", down, dtype, (k, hidden))
            y = self.emit("MatMul", [x, w], "down_matmul")
        else:
            inputs = [x, *(self.constant(f"down_{part}", array) for part, array in
                           zip(("weight", "scales", "zero_points"), self.packed_down(refit, linear),
                               strict=True)
                           if array is not None)]  # fmt: skip
            q = first.quant
            y = self.emit("MatMulNBits", inputs, "down_matmul", domain="com.microsoft", K=k, N=q.n,
                          bits=q.bits, block_size=q.block_size,
                          accuracy_level=q.accuracy_level)  # fmt: skip
        bias = _wide_biases(weights, run, _np_dtype(weights, run[0].gate.weight)).get("down")
        if bias is not None:
            y = self.emit("Add", [y, self.constant("down_bias", bias)], "down_bias_add")
        return y

    def packed_down(self, refit: np.ndarray | None, linear: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:  # fmt: skip
        """The quantised down projections joined along K in the packed domain, or ``refit``
        quantised in the join's layout (ranks, dtypes)."""
        run, weights = self.run, self.weights
        hidden = run[0].hidden
        parts = []
        for b in run:
            q = b.down.weight.quant
            assert q is not None
            zero_points = initializer(weights, q.zero_points) if q.zero_points else None
            parts.append((initializer(weights, b.down.weight.name), initializer(weights, q.scales),
                          zero_points, q))  # fmt: skip
        packed, scales, zero_points = join_along_k(parts)
        if linear and refit is None:  # the join, dequantised, and zeros for n̂
            join = replace(parts[0][3], k=sum(b.intermediate for b in run))
            w = dequantize(packed, scales, zero_points, join).T.astype(np.float32)
            refit = np.concatenate([w, np.zeros((hidden, hidden), np.float32)])
        if refit is None:
            return packed, scales, zero_points
        joined = replace(parts[0][3], k=refit.shape[0])
        if refit.shape[0] % joined.block_size:
            raise GraphfuseError(
                f"blocks {run[0].index}-{run[-1].index}: a down projection of {refit.shape[0]} "
                f"inputs does not divide into MatMulNBits blocks of {joined.block_size}"
            )
        new = quantize(refit, joined, zero_points=zero_points is not None,
                       scales_dtype=scales.dtype)  # fmt: skip
        packed = _like(new[0], packed, joined)
        scales = _like(new[1], scales, joined)
        if zero_points is not None:
            assert new[2] is not None
            zp = new[2]
            if zero_points.dtype != np.uint8:  # stored as values of the scales' type
                zp = unpack(zp, joined.bits, joined.blocks).astype(zero_points.dtype)
            zero_points = _like(zp, zero_points, joined)
        return packed, scales, zero_points


def _fresh(prefix: str, graph: ir.Graph) -> str:
    """``prefix``, or ``prefix#2``, … where a model fused before already has names under it
    (fusing in stages: block numbers shift after each fusion)."""
    taken = {name.rpartition("/")[0] for name in graph.initializers}
    name, k = prefix, 1
    while name in taken:
        k += 1
        name = f"{prefix}#{k}"
    return name


def _like(array: np.ndarray, stored: np.ndarray, quant) -> np.ndarray:
    """``array`` (a quantiser output) in the rank ``stored`` has: [N, blocks, blob], [N, …] or
    flat, for a K that may differ from the stored one's."""
    shape = {3: (quant.n, quant.blocks, -1), 2: (quant.n, -1), 1: (-1,)}[stored.ndim]
    return array.reshape(shape)


def _np_dtype(weights: Weights, weight: Weight) -> np.dtype:
    elem = _elem(weights, weight)
    if elem == onnx.TensorProto.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))  # type: ignore[arg-type]


def _elem(weights: Weights, weight: Weight) -> int | None:
    return irs.elem_type(weights.get(weight.quant.scales if weight.quant else weight.name))


def gain_of(weights: Weights, block: FfnBlock) -> np.ndarray:
    """γ as a float32 vector [H] (the product of the norm's gains; ones when it has none)."""
    gamma = np.ones(block.hidden, np.float32)
    for _, name in block.norm.gains:
        gamma = gamma * np.asarray(initializer(weights, name), np.float32).reshape(-1)
    return gamma


def _wide_weight(weights: Weights, run: list[FfnBlock], role: str, dtype: np.dtype) -> np.ndarray:
    """[diag(γ₁)W₁ | … ] for the gate or up weights (quantised weights dequantised), filled block
    by block so that only one block's weights are in flight beside the result."""
    wide = np.empty((run[0].hidden, sum(b.intermediate for b in run)), dtype)
    at = 0
    for block in run:
        gamma = gain_of(weights, block)[:, None]
        w = getattr(block, role).weight.load(weights).astype(np.float32)
        # γ is folded in float32 and rounded once to the weights' dtype.
        wide[:, at : at + block.intermediate] = (gamma * w).astype(dtype)
        at += block.intermediate
    return wide


def _wide_biases(weights: Weights, run: list[FfnBlock], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Gate and up biases concatenate (zeros where a block has none); down biases add up."""
    out: dict[str, np.ndarray] = {}
    for role in ("gate", "up"):
        if any(getattr(b, role).bias for b in run):
            out[role] = np.concatenate(
                [_bias(weights, getattr(b, role).bias, b.intermediate).astype(np.float32)
                 for b in run]
            ).astype(dtype)  # fmt: skip
    if any(b.down.bias for b in run):
        out["down"] = sum(
            (_bias(weights, b.down.bias, b.hidden).astype(np.float32) for b in run),
            np.zeros(run[0].hidden, np.float32),
        ).astype(dtype)
    return out


def _bias(weights: Weights, bias: Weight | None, size: int) -> np.ndarray:
    return np.zeros(size, np.float32) if bias is None else bias.load(weights).reshape(-1)
