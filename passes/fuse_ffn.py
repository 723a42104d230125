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
their doc_string; nodes and initializers left dead by the rewrite are removed; order stays
topological (the new nodes take the place of the run's last residual Add).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

import ml_dtypes
import numpy as np
import onnx
from onnx import helper

from graphfuse.blocks import FfnBlock, Weight, weight_dtype
from graphfuse.errors import GraphfuseError
from graphfuse.graph import GraphIndex
from graphfuse.nbits import dequantize, join_along_k, quantize, unpack
from graphfuse.onnx_io import TensorSink
from graphfuse.surgery import rebuild

RULE = "graphfuse.fuse_ffn"


@dataclass(frozen=True)
class FusedRun:
    first: int
    last: int
    hidden: int
    width: int  # Σ Iᵢ
    output: str  # the value the fused residual Add writes (the run's original output)


def fuse_ffn_runs(
    g: GraphIndex,
    runs: list[list[FfnBlock]],
    sink: TensorSink | None = None,
    progress=None,
    pack: bool = False,
    downs: dict[tuple[int, int], np.ndarray] | None = None,
    requantize: bool = False,
    linear: Collection[tuple[int, int]] = (),
) -> tuple[onnx.ModelProto, list[FusedRun]]:
    """Return a new model with every run in ``runs`` fused; ``g`` indexes the input model.

    ``pack``: gate and up as one MatMul followed by Split (else two MatMuls). ``downs``: float32
    [ΣI, H] down projections to use instead of the join, by (first, last) block (a repair's
    refit, from a plan); quantised projections are requantised by onnxruntime's quantiser.
    ``requantize``: quantised gate/up weights are dequantised, γ-folded, concatenated and
    requantised (one shared norm, one gate and one up MatMulNBits: faster, not exact) instead
    of kept per branch (exact). ``linear``: runs, by (first, last) block, whose down projection
    also reads the normalised run input (its ``downs`` entry is then [ΣI + H, H]; without one,
    those H rows are zeros)."""
    sink = sink or TensorSink()
    replaced: dict[int, list[onnx.NodeProto]] = {}  # anchor node -> the nodes that replace it
    removed: set[int] = set()
    new_tensors: list[onnx.TensorProto] = []
    fused: list[FusedRun] = []
    for run in runs:
        key = (run[0].index, run[-1].index)
        down = (downs or {}).get(key)
        replacement, tensors = _fuse_run(g, run, sink, pack, down, requantize, key in linear)
        replaced[run[-1].residual_add] = replacement
        removed.update(*(b.nodes for b in run))
        new_tensors.extend(tensors)
        fused.append(
            FusedRun(run[0].index, run[-1].index, run[0].hidden,
                     sum(b.intermediate for b in run), run[-1].residual_out)
        )  # fmt: skip
        if progress is not None:
            progress.update(len(run))
    nodes: list[onnx.NodeProto] = []
    for i, node in enumerate(g.nodes):
        if i in replaced:
            nodes.extend(replaced[i])
        elif i not in removed:
            nodes.append(node)
    return rebuild(g, nodes, new_tensors), fused


# -- one run ---------------------------------------------------------------------------------------


def _fuse_run(
    g: GraphIndex,
    run: list[FfnBlock],
    sink: TensorSink,
    pack: bool,
    down: np.ndarray | None,
    requantize: bool = False,
    linear: bool = False,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    first, last = run[0], run[-1]
    width = sum(b.intermediate for b in run) + (first.hidden if linear else 0)
    if down is not None and down.shape != (width, first.hidden):
        raise GraphfuseError(
            f"the down projection given for blocks {first.index}-{last.index} is "
            f"{list(down.shape)}, not [{width}, {first.hidden}]: it was made for another model"
        )
    prefix = f"graphfuse/ffn{first.index}-{last.index}"
    doc = f"{RULE}: FFN blocks {first.index}-{last.index} as one wide FFN"
    names: dict[str, str] = {first.residual_in: first.residual_in}
    nodes: list[onnx.NodeProto] = []
    tensors: list[onnx.TensorProto] = []

    def emit(op: str, inputs: list[str], output: str, **attrs) -> str:
        name = f"{prefix}/{output}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, doc_string=doc, **attrs))
        return name

    def copy_island(block_nodes, drop: dict[int, str] = {}) -> None:  # noqa: B006
        """Copy nodes of ``first`` renamed into the prefix; ``drop`` maps a skipped node to
        the input that stands for its output."""
        for i in sorted(block_nodes):
            node = g.node(i)
            if i in drop:
                names[node.output[0]] = names[drop[i]]
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[:] = [names.get(v, v) for v in node.input]
            copy.output[:] = [names.setdefault(v, f"{prefix}/{v}") for v in node.output]
            copy.name = f"{prefix}/{node.name or node.output[0]}"
            copy.doc_string = doc
            nodes.append(copy)

    def unit_norm() -> str:
        """n̂: block 1's norm with its gains removed (a gain Mul is skipped; a norm op's scale
        becomes ones)."""
        norm = first.norm
        drop = {}
        for at, gain in norm.gains:
            node = g.node(at)
            if node.op_type == "Mul":
                drop[at] = node.input[1] if node.input[0] == gain else node.input[0]
            else:
                shape = g.shape_of_constant(gain) or ()
                ones = np.ones(shape, helper.tensor_dtype_to_np_dtype(g.elem_type(gain)))  # type: ignore[arg-type]
                tensors.append(sink.tensor(f"{prefix}/unit_gain", ones))
                names[gain] = f"{prefix}/unit_gain"
        copy_island(norm.nodes, drop)
        return names[norm.output]

    quant = first.gate.weight.quant
    if any(p.weight.quant for b in run for p in (b.gate, b.up, b.down)) and not requantize:
        extra = [unit_norm()] if linear else []
        y = _per_branch_ffn(g, run, prefix, doc, nodes, tensors, sink, down, extra)
    else:
        z = unit_norm()

        dtype = _np_dtype(g, first.gate.weight)
        gate_w, up_w = _wide_weights(g, run, dtype)
        biases = _wide_biases(g, run, dtype)
        if pack:  # one [H, 2ΣI] GEMM, then Split: gate and up read the same z
            weights = {"gate_up": np.concatenate([gate_w, up_w], axis=1)}
            if "gate" in biases or "up" in biases:
                width = gate_w.shape[1]
                zeros = np.zeros(width, dtype)
                biases["gate_up"] = np.concatenate(
                    [biases.pop("gate", zeros), biases.pop("up", zeros)]
                )
        else:
            weights = {"gate": gate_w, "up": up_w}
        shapes = {role: array.shape for role, array in weights.items()}
        for role, array in weights.items():
            if quant is None:
                tensors.append(sink.tensor(f"{prefix}/{role}_weight", array))
                continue
            layout = replace(quant, k=array.shape[0], n=array.shape[1])
            zero_points = quant.zero_points is not None
            packed, scales, zp = quantize(
                array, layout, zero_points=zero_points, scales_dtype=dtype
            )
            tensors.append(sink.tensor(f"{prefix}/{role}_weight", packed))
            tensors.append(sink.tensor(f"{prefix}/{role}_scales", scales))
            if zp is not None:
                tensors.append(sink.tensor(f"{prefix}/{role}_zero_points", zp))
        del gate_w, up_w, weights  # the sink holds them now (on disk when streaming)

        def project(x: str, role: str) -> str:
            if quant is None:
                y = emit("MatMul", [x, f"{prefix}/{role}_weight"], f"{role}_matmul")
            else:
                inputs = [x, f"{prefix}/{role}_weight", f"{prefix}/{role}_scales"]
                if quant.zero_points is not None:
                    inputs.append(f"{prefix}/{role}_zero_points")
                k, n = shapes[role]
                y = emit("MatMulNBits", inputs, f"{role}_matmul", domain="com.microsoft", K=k,
                         N=n, bits=quant.bits, block_size=quant.block_size,
                         accuracy_level=quant.accuracy_level)  # fmt: skip
            if role in biases:
                tensors.append(sink.tensor(f"{prefix}/{role}_bias", biases[role]))
                y = emit("Add", [y, f"{prefix}/{role}_bias"], f"{role}_bias_add")
            return y

        if pack:
            width = sum(b.intermediate for b in run)
            split = f"{prefix}/split_sizes"
            tensors.append(sink.tensor(split, np.array([width, width], np.int64)))
            gate, up = f"{prefix}/gate", f"{prefix}/up"
            nodes.append(
                helper.make_node("Split", [project(z, "gate_up"), split], [gate, up],
                                 name=f"{prefix}/split", axis=-1, doc_string=doc)
            )  # fmt: skip
            names[first.activation_input] = gate
        else:
            names[first.activation_input] = project(z, "gate")
            up = project(z, "up")
        copy_island(first.activation_nodes)
        product = emit("Mul", [names[first.activation_output], up], "product")
        if linear:
            product = emit("Concat", [product, z], "products", axis=-1)
        y = _joined_down(g, run, product, prefix, doc, nodes, tensors, sink, down, linear)
    for at in reversed(last.down_casts):
        cast = onnx.NodeProto()
        cast.CopyFrom(g.node(at))
        cast.input[0] = y
        if cast.op_type == "CastLike" and cast.input[1] == last.residual_in:
            cast.input[1] = first.residual_in  # same stream, same type; the other is gone
        y = cast.output[0] = f"{prefix}/{cast.output[0]}"
        cast.name, cast.doc_string = y, doc
        nodes.append(cast)
    add = g.node(last.residual_add)
    x = first.residual_in
    inputs = [x, y] if add.input[0] == last.residual_in else [y, x]
    nodes.append(
        helper.make_node(
            "Add", inputs, [last.residual_out], name=f"{prefix}/residual", doc_string=doc
        )
    )
    return nodes, tensors


def _per_branch_ffn(
    g: GraphIndex,
    run: list[FfnBlock],
    prefix: str,
    doc: str,
    nodes: list[onnx.NodeProto],
    tensors: list[onnx.TensorProto],
    sink: TensorSink,
    down: np.ndarray | None = None,
    extra: Sequence[str] = (),
) -> str:
    """The exact form for quantised weights: per-branch norm and gate/up, one joined down
    (``extra``: more features for it, the linear stand-in's n̂).

        X ─┬─ n₁ ─ gate₁/up₁ ─ act ─ Mul ─┐
           ├─ …                            Concat ─ MatMulNBits[W2₁; …; W2ₖ] ─ y
           └─ nₖ ─ gateₖ/upₖ ─ act ─ Mul ─┘

    A block's γ cannot be folded into blockwise-quantised gate/up weights exactly (a scale is
    shared by block_size inputs, γ differs per input), so each branch keeps its own norm (a
    copy of block i's norm island on the run's input X: nᵢ(X), as the parallel reference has
    it) and its own quantised gate and up. Re-spelling the norm as one shared x/rms(x) and a
    Mul by γᵢ would round differently by an ulp, and MatMulNBits' int8 quantisation of its
    input (accuracy_level 4) turns an ulp into a quantisation step. The down projections join
    along K in the packed domain (`graphfuse.nbits.join_along_k`): exact when every Iᵢ is a
    multiple of block_size, which the run finder checked, since the joined input is quantised
    in the same blocks of K as the parts."""
    x = run[0].residual_in
    products = []
    for i, block in enumerate(run):
        names = {block.residual_in: x}
        inner = block.norm.nodes | block.gate.nodes | block.up.nodes | block.activation_nodes
        for at in sorted(inner | {block.product}):
            copy = onnx.NodeProto()
            copy.CopyFrom(g.node(at))
            copy.input[:] = [names.get(v, v) for v in copy.input]
            copy.output[:] = [names.setdefault(v, f"{prefix}/branch{i}/{v}") for v in copy.output]
            copy.name, copy.doc_string = f"{prefix}/branch{i}/{copy.name or at}", doc
            nodes.append(copy)
        products.append(names[g.node(block.product).output[0]])
    joined = f"{prefix}/products"
    nodes.append(helper.make_node("Concat", [*products, *extra], [joined], name=joined, axis=-1,
                                  doc_string=doc))  # fmt: skip
    return _joined_down(g, run, joined, prefix, doc, nodes, tensors, sink, down, bool(extra))


def _joined_down(
    g: GraphIndex,
    run: list[FfnBlock],
    x: str,
    prefix: str,
    doc: str,
    nodes: list[onnx.NodeProto],
    tensors: list[onnx.TensorProto],
    sink: TensorSink,
    refit: np.ndarray | None = None,
    linear: bool = False,
) -> str:
    """One down projection over the joined hidden features: [W2₁; …; W2ₖ], biases summed;
    ``refit`` (float32 [ΣI, H], or [ΣI + H, H] with ``linear``) instead of the join when given,
    requantised if quantised. ``linear`` without a refit: the join and H zero rows."""
    first = run[0].down.weight
    y = f"{prefix}/down_matmul"
    hidden = run[0].hidden
    if first.quant is None:
        if refit is None:
            down = np.concatenate([b.down.weight.load(g) for b in run], axis=0)
            if linear:
                down = np.concatenate([down, np.zeros((hidden, hidden), down.dtype)])
        else:
            down = refit.astype(_np_dtype(g, first))
        tensors.append(sink.tensor(f"{prefix}/down_weight", down))
        nodes.append(helper.make_node("MatMul", [x, f"{prefix}/down_weight"], [y], name=y,
                                      doc_string=doc))  # fmt: skip
    else:
        parts = []
        for b in run:
            q = b.down.weight.quant
            assert q is not None
            zero_points = g.constant(q.zero_points) if q.zero_points else None
            parts.append((g.constant(b.down.weight.name), g.constant(q.scales), zero_points, q))
        packed, scales, zero_points = join_along_k(parts)  # type: ignore[arg-type]
        if linear and refit is None:  # the join, dequantised, and zeros for n̂
            join = replace(parts[0][3], k=sum(b.intermediate for b in run))
            w = dequantize(packed, scales, zero_points, join).T.astype(np.float32)
            refit = np.concatenate([w, np.zeros((hidden, hidden), np.float32)])
        if refit is not None:  # the join's layout (ranks, dtypes), the refit's values
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
        inputs = [x, f"{prefix}/down_weight", f"{prefix}/down_scales"]
        tensors.append(sink.tensor(inputs[1], packed))
        tensors.append(sink.tensor(inputs[2], scales))
        if zero_points is not None:
            inputs.append(f"{prefix}/down_zero_points")
            tensors.append(sink.tensor(inputs[3], zero_points))
        q = first.quant
        nodes.append(
            helper.make_node(
                "MatMulNBits", inputs, [y], name=y, domain="com.microsoft", doc_string=doc,
                K=sum(b.intermediate for b in run) + (hidden if linear else 0), N=q.n, bits=q.bits,
                block_size=q.block_size,
                accuracy_level=q.accuracy_level,
            )
        )  # fmt: skip
    bias = _wide_biases(g, run, _np_dtype(g, run[0].gate.weight)).get("down")
    if bias is not None:
        tensors.append(sink.tensor(f"{prefix}/down_bias", bias))
        added = f"{prefix}/down_bias_add"
        nodes.append(helper.make_node("Add", [y, f"{prefix}/down_bias"], [added], name=added,
                                      doc_string=doc))  # fmt: skip
        y = added
    return y


def _like(array: np.ndarray, stored: np.ndarray, quant) -> np.ndarray:
    """``array`` (a quantiser output) in the rank ``stored`` has: [N, blocks, blob], [N, …] or
    flat, for a K that may differ from the stored one's."""
    shape = {3: (quant.n, quant.blocks, -1), 2: (quant.n, -1), 1: (-1,)}[stored.ndim]
    return array.reshape(shape)


def _np_dtype(g: GraphIndex, weight: Weight) -> np.dtype:
    elem = weight_dtype(g, weight)
    if elem == onnx.TensorProto.BFLOAT16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem))  # type: ignore[arg-type]


def gain_of(g: GraphIndex, block: FfnBlock) -> np.ndarray:
    """γ as a float32 vector [H] (the product of the norm's gains; ones when it has none)."""
    gamma = np.ones(block.hidden, np.float32)
    for _, name in block.norm.gains:
        gamma = gamma * np.asarray(g.constant(name), np.float32).reshape(-1)
    return gamma


def _wide_weights(
    g: GraphIndex, run: list[FfnBlock], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """[diag(γ₁)W1₁ | … ] and [diag(γ₁)W3₁ | … ] (quantised weights dequantised), filled block
    by block so that only one block's weights are in flight beside the result."""
    hidden = run[0].hidden
    width = sum(b.intermediate for b in run)
    gate = np.empty((hidden, width), dtype)
    up = np.empty((hidden, width), dtype)
    at = 0
    for block in run:
        gamma = gain_of(g, block)[:, None]
        cols = slice(at, at + block.intermediate)
        # γ is folded in float32 and rounded once to the weights' dtype.
        gate[:, cols] = (gamma * block.gate.weight.load(g).astype(np.float32)).astype(dtype)
        up[:, cols] = (gamma * block.up.weight.load(g).astype(np.float32)).astype(dtype)
        at += block.intermediate
    return gate, up


def _wide_biases(g: GraphIndex, run: list[FfnBlock], dtype: np.dtype) -> dict[str, np.ndarray]:
    """Gate and up biases concatenate (zeros where a block has none); down biases add up."""
    out: dict[str, np.ndarray] = {}
    for role in ("gate", "up"):
        if any(getattr(b, role).bias for b in run):
            out[role] = np.concatenate(
                [_bias(g, getattr(b, role).bias, b.intermediate).astype(np.float32) for b in run]
            ).astype(dtype)
    if any(b.down.bias for b in run):
        out["down"] = sum(
            (_bias(g, b.down.bias, b.hidden).astype(np.float32) for b in run),
            np.zeros(run[0].hidden, np.float32),
        ).astype(dtype)
    return out


def _bias(g: GraphIndex, bias: Weight | None, size: int) -> np.ndarray:
    return np.zeros(size, np.float32) if bias is None else bias.load(g).reshape(-1)
