"""The Python API: `inspect` a model, `fuse` its FFN runs, get a `FusionReport`.

    model, report = graphfuse.fuse("model.onnx", runs="all", keep_last=True)
    report = graphfuse.fuse_file("model.onnx", "fused.onnx", runs="3-7,24-28")

Block numbers are FFN-block indices in graph order, 0-based, as `inspect` prints them.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir
from tqdm import tqdm

from graphfuse import genai, onnx_io, skip_norm
from graphfuse import ir as irs
from graphfuse.blocks import FfnBlock, NearMiss, find_blocks
from graphfuse.canonical import canonicalize
from graphfuse.errors import GraphfuseError
from graphfuse.runs import Refusal, Run, find_runs

# A proto, a path (an .onnx file or an onnxruntime-genai folder), or an onnx-graphsurgeon Graph.
ModelLike = onnx.ModelProto | str | os.PathLike | Any


@dataclass
class Inspection:
    """What the recogniser and the run finder see in a model: ``model`` is the canonical form
    they read, skip norms split (`graphfuse.skip_norm`); a pass edits it in place."""

    model: ir.Model
    blocks: list[FfnBlock]
    runs: list[Run]  # maximal runs, single blocks included
    refusals: list[Refusal]
    near_misses: list[NearMiss]
    split: skip_norm.Split = field(default_factory=skip_norm.Split)  # to join after a pass
    candidates: list[NearMiss] = field(default_factory=list)  # where no block was found: why

    def fusable(self) -> list[Run]:
        return [r for r in self.runs if len(r) > 1]

    def as_dict(self) -> dict:
        return {
            "blocks": [
                {
                    "index": b.index,
                    "residual_add": b.residual_add.name or b.residual_out,
                    "hidden": b.hidden,
                    "intermediate": b.intermediate,
                    "activation": b.activation,
                    "eps": b.norm.eps,
                    "norm": b.norm.op,
                    "dtype": b.dtype,
                }
                for b in self.blocks
            ],
            "runs": [str(r) for r in self.runs if len(r) > 1],
            "refusals": [
                {"blocks": f"{r.left}-{r.left + 1}", "reason": r.reason} for r in self.refusals
            ],
            "near_misses": [asdict(m) for m in self.near_misses],
            "candidates": [asdict(m) for m in self.candidates],
        }


@dataclass
class Depth:
    ffn_stages: int  # FFN blocks a token passes through one after another
    gemms: int  # MatMul/Gemm nodes on the longest path of the graph


@dataclass
class FusionReport:
    blocks: int
    runs_fused: list[str]
    widths: list[int]  # Σ I of each fused run
    refusals: list[dict]
    nodes_before: int
    nodes_after: int
    parameters_before: int
    parameters_after: int
    depth_before: Depth
    depth_after: Depth
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def model_path(model: str | os.PathLike) -> Path:
    """The ONNX file behind ``model``: itself, or the one an onnxruntime-genai folder names."""
    return genai.model_file(model) if genai.is_folder(model) else Path(model)


def _is_graphsurgeon(model: object) -> bool:
    return type(model).__module__.startswith("onnx_graphsurgeon")


def _load(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    if _is_graphsurgeon(model):  # TensorRT-side pipelines hold gs.Graph objects
        import onnx_graphsurgeon as gs

        return gs.export_onnx(model), None
    path = model_path(model)
    return onnx_io.load(path), onnx_io.model_base_dir(path)


def inspect(model: ModelLike, base_dir: Path | None = None) -> Inspection:
    """Find the FFN blocks, runs and refusals of a model (a proto or a path); ``base_dir`` is
    where a proto's external data lives."""
    proto, found_dir = _load(model)
    base_dir = base_dir or found_dir
    # Constants folded (Constant, CastLike, Identity, shape arithmetic), residual Adds split out
    # of skip norms: the recogniser sees one spelling. Weights are never read here.
    proto, _ = canonicalize(proto, base_dir, in_place=not isinstance(model, onnx.ModelProto))
    m = irs.from_proto(proto, base_dir)
    irs.infer_types(m)  # element types where the graph does not declare them (cast islands)
    split = skip_norm.split(m)
    blocks, misses = find_blocks(m, all_misses=True)
    near = [miss for miss in misses if miss.near]
    runs, refusals = find_runs(m.graph, blocks, near)
    found = Inspection(m, blocks, runs, refusals, near, split)
    if not blocks:
        found.candidates = misses
    return found


def parse_runs(spec: str | list[tuple[int, int]], found: Inspection) -> list[Run]:
    """``"all"``, ``"3-7,24-28"`` or [(3, 7), …] → runs; each must lie inside one maximal run."""
    if isinstance(spec, str):
        if spec.strip() == "all":
            return found.fusable()
        pairs: list[tuple[int, int]] = []
        for part in spec.split(","):
            try:
                first, _, last = part.strip().partition("-")
                pairs.append((int(first), int(last or first)))
            except ValueError:
                raise GraphfuseError(
                    f"--runs: '{part}' is not a block range like 3-7 (or use 'all')"
                ) from None
    else:
        pairs = list(spec)
    runs = []
    for a, b in pairs:
        if not 0 <= a < b < len(found.blocks):
            raise GraphfuseError(
                f"runs: {a}-{b} names no run: blocks are numbered 0-{len(found.blocks) - 1} and a "
                "run needs at least two (see 'graphfuse inspect')"
            )
        broken = [r for r in found.refusals if a <= r.left < b]
        if broken:
            r = broken[0]
            raise GraphfuseError(
                f"runs: {a}-{b} is not one run: blocks {r.left} and {r.left + 1} cannot be fused "
                f"({r.reason})"
            )
        runs.append(Run(a, b))
    runs.sort(key=lambda r: r.first)
    for left, right in itertools.pairwise(runs):
        if right.first <= left.last:
            raise GraphfuseError(f"runs: {left} and {right} overlap")
    return runs


def plan(
    found: Inspection,
    runs: str | list[tuple[int, int]] = "all",
    *,
    max_run_length: int | None = None,
    keep_last: bool = False,
) -> list[Run]:
    """The runs to fuse: ``runs`` split into pieces of at most ``max_run_length`` blocks, each
    without its last block when ``keep_last`` (the paper's Table 5), pieces of one dropped."""
    if max_run_length is not None and max_run_length < 2:
        raise GraphfuseError("--max-run-length must be at least 2")
    chosen = []
    for run in parse_runs(runs, found):
        step = max_run_length or len(run)
        for a in range(run.first, run.last + 1, step):
            piece = Run(a, min(a + step - 1, run.last))
            if keep_last:
                piece = Run(piece.first, piece.last - 1)
            if len(piece) > 1:
                chosen.append(piece)
    return chosen


def parallel_reference(found: Inspection, runs: list[Run]) -> onnx.ModelProto:
    """The unfused model with every block of each run reading the run's input X: the run's
    output becomes X + Σᵢ FFNᵢ(nᵢ(X)), computed by the model's own ops, which is what the
    fusion of those runs must equal. Only the norms' inputs are rewired; the residual Adds
    chain as before."""
    model = found.model.clone()  # tensors shared, nodes new: in the same order
    node = dict(zip(found.model.graph, model.graph, strict=True))
    named = irs.values(model.graph)
    for run in runs:
        x = named[found.blocks[run.first].residual_in]
        for block in found.blocks[run.first + 1 : run.last + 1]:
            for norm in block.norm.nodes:
                for i, v in enumerate(node[norm].inputs):
                    if v is not None and v.name == block.residual_in:
                        node[norm].replace_input_with(i, x)
    skip_norm.join(model, found.split)
    return irs.to_proto(model)


def depth(model: ir.Model, ffn_stages: int) -> Depth:
    """Sequential depth: FFN stages, and GEMMs on the graph's longest path."""
    longest: dict[ir.Value, int] = {}
    best = 0
    for node in model.graph:
        d = max((longest.get(v, 0) for v in node.inputs if v is not None), default=0)
        d += node.op_type in ("MatMul", "Gemm", "MatMulNBits")
        for v in node.outputs:
            longest[v] = d
        best = max(best, d)
    return Depth(ffn_stages, best)


def parameters(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value)


def fuse(
    model: ModelLike,
    runs: str | list[tuple[int, int]] = "all",
    *,
    max_run_length: int | None = None,
    keep_last: bool = False,
    progress: bool = False,
    pack: bool = False,
    requantize: bool = False,
    linear: Collection[tuple[int, int]] = (),
) -> tuple[onnx.ModelProto, FusionReport]:
    """Fuse ``runs`` of ``model`` in memory; return the new model and its report. An
    onnx-graphsurgeon ``Graph`` in gives a ``Graph`` out; anything else gives a ModelProto.

    ``pack`` writes gate and up as one MatMul and a Split instead of two MatMuls.
    ``requantize``: quantised (MatMulNBits) gate/up weights are γ-folded, concatenated and
    requantised by onnxruntime's quantiser (faster, not exact) instead of kept per branch.
    ``linear``: runs (first, last) whose down projection also reads the normalised run input,
    with zero weights until refitted (`graphfuse.repair`, ``heal="linear"``)."""
    fused, report = _fuse(
        model, runs, max_run_length, keep_last, progress, pack=pack, requantize=requantize,
        linear=linear,
    )  # fmt: skip
    proto = irs.to_proto(fused)
    if _is_graphsurgeon(model):
        import onnx_graphsurgeon as gs

        return gs.import_onnx(proto), report
    return proto, report


def fuse_file(
    model: str | os.PathLike,
    output: str | os.PathLike,
    runs: str | list[tuple[int, int]] = "all",
    *,
    max_run_length: int | None = None,
    keep_last: bool = False,
    progress: bool = False,
    check: bool = True,
    pack: bool = False,
    requantize: bool = False,
) -> FusionReport:
    """Fuse a model file into ``output`` (atomically; external data beside it, streamed so that
    memory stays near one run's weights). The input is only read."""

    def transform(proto, base_dir):
        return _fuse(proto, runs, max_run_length, keep_last, progress, base_dir, pack,
                     requantize=requantize)  # fmt: skip

    return _transform_file(model, output, transform, check)


def drop_attention_file(
    model: str | os.PathLike, output: str | os.PathLike, layers: str | list[int], check: bool = True
):
    """Remove the attention of ``layers`` (FFN-block numbers, e.g. "25-28") from a model file."""
    from graphfuse.passes.drop_attention import drop_attention

    def transform(proto, base_dir):
        return drop_attention(proto, parse_indices(layers), base_dir)

    return _transform_file(model, output, transform, check)


def parse_indices(spec: str | list[int]) -> list[int]:
    """ "25-28,3" → [3, 25, 26, 27, 28]."""
    if not isinstance(spec, str):
        return sorted(set(spec))
    out: set[int] = set()
    for part in spec.split(","):
        try:
            a, _, b = part.strip().partition("-")
            out.update(range(int(a), int(b or a) + 1))
        except ValueError:
            raise GraphfuseError(f"'{part}' is not a layer number or range like 25-28") from None
    return sorted(out)


def _transform_file(model, output, transform, check: bool):
    """Load, transform, save atomically (weights streamed to the output's data file) and check
    that a model the checker accepted is still accepted. An onnxruntime-genai folder in gives a
    complete folder out. ``transform(proto, base_dir)`` gives (a proto or IR model, report)."""
    if genai.is_folder(model):
        return genai.transform_folder(
            Path(model), Path(output), lambda m, o: _transform_file(m, o, transform, check)
        )
    source = Path(model)
    proto = onnx_io.load(source)
    base_dir = onnx_io.model_base_dir(source)
    proto, _ = canonicalize(proto, base_dir, in_place=True)  # ours: fold without a copy
    out = onnx_io.check_output_path(output, [source, *onnx_io.external_files(proto, base_dir)])
    input_valid = check and onnx_io.validation_error(source) is None
    result, report = transform(proto, base_dir)
    onnx_io.save(result, out, base_dir=base_dir)
    if input_valid and (problem := onnx_io.validation_error(out)) is not None:
        raise GraphfuseError(f"internal error: the output model fails validation: {problem}")
    return report


def _fuse(
    model, runs, max_run_length, keep_last, progress, base_dir=None, pack=False, downs=None,
    requantize=False, linear=(),
) -> tuple[ir.Model, FusionReport]:  # fmt: skip
    from graphfuse.passes.fuse_ffn import FuseFfn

    found = inspect(model, base_dir)
    model = found.model
    if not found.blocks:
        raise GraphfuseError(
            "no FFN blocks found: the model has no gated FFN (norm → gate/up → act → down → "
            "residual Add) that graphfuse recognises"
        )
    chosen = plan(found, runs, max_run_length=max_run_length, keep_last=keep_last)
    stages_before = len(found.blocks)
    stages_after = stages_before - sum(len(r) - 1 for r in chosen)
    nodes_before = len(model.graph) - len(found.split.originals)  # each split added one
    parameters_before, depth_before = parameters(model), depth(model, stages_before)
    with tqdm(
        total=sum(len(r) for r in chosen), desc="fusing", unit="block", disable=not progress
    ) as bar:
        runs = [[found.blocks[i] for i in r.indices] for r in chosen]
        done = FuseFfn(runs, pack=pack, downs=downs, requantize=requantize, linear=linear,
                       progress=bar)(model).report  # fmt: skip
    skip_norm.join(model, found.split)
    report = FusionReport(
        blocks=len(found.blocks),
        runs_fused=[f"{r.first}-{r.last}" for r in done],
        widths=[r.width for r in done],
        refusals=[{"blocks": f"{r.left}-{r.left + 1}", "reason": r.reason} for r in found.refusals],
        nodes_before=nodes_before,
        nodes_after=len(model.graph),
        parameters_before=parameters_before,
        parameters_after=parameters(model),
        depth_before=depth_before,
        depth_after=depth(model, stages_after),
    )
    if not chosen:
        report.notes.append("nothing to fuse: no run of two or more blocks was selected")
    return model, report
