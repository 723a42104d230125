"""The plan: what FFN Fusion decided for one model, saved once and applied to any format.

    plan.json            plan.safetensors
    ─────────            ────────────────
    schema, version      layers.3-7.down_proj      float32 [ΣI, H]   (one per healed run; [ΣI + H, H] for "linear")
    source: layers, H, I per layer, digest
    attention_removed: [4, 5, 6, 7]
    runs: [{"layers": [3, 7], "heal": "ffn", "target": "original", "lambda": 0.1}]

Layers are named by their number in the original model (layer j holds FFN block j), never by
the block numbers of a fused model, which shift. ``source`` records the shapes of the model the
plan was made on and a digest of its norm gains (rounded to bfloat16): the gains are stored
unquantised in every format (an fp32 or int4 onnxruntime-genai build, the Hugging Face folder,
the GGUF), so the digest identifies the model across formats, and a plan applied to another
model is refused. Refitted down projections are stored in float32; applied to a model whose
projections are ``MatMulNBits``, they are requantised in that model's own layout (bits,
block_size, zero points) by onnxruntime's quantiser (``graphfuse.nbits.quantize``).

``apply`` rebuilds the result from the plan and a source without recomputing anything: attention
removal, then fusion with the stored weights. Attention a source no longer has (a model the
removal was already applied to) is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    from graphfuse.api import Inspection

SCHEMA = "graphfuse.plan"
VERSION = 1
# plain join; down projection refitted (weights in the plan); refitted over [h, n̂(X)], with a
# linear stand-in for the removed attention (not expressible as nemotron-nas)
HEALS = ("none", "ffn", "linear")
GATE_UP = ("exact", "requantized")  # quantised gate/up: per branch, or γ-folded and requantised
TARGETS = ("onnx", "genai", "nemotron-nas")


@dataclass(frozen=True)
class Source:
    """The model a plan was made on."""

    layers: int
    hidden: int
    intermediate: tuple[int, ...]  # per layer
    digest: str  # sha256 of every layer's norm gain, rounded to bfloat16

    def describe(self) -> str:
        widths = sorted(set(self.intermediate))
        return f"{self.layers} layers, H={self.hidden}, I={'/'.join(map(str, widths))}"


@dataclass(frozen=True)
class RunPlan:
    first: int  # layer numbers of the original model, inclusive
    last: int
    heal: str = "none"
    target: str | None = None  # what a refit was fitted to: "original" or "input"
    lam: float | None = None

    @property
    def key(self) -> str:
        return f"layers.{self.first}-{self.last}.down_proj"


@dataclass
class Plan:
    source: Source
    attention_removed: list[int] = field(default_factory=list)
    runs: list[RunPlan] = field(default_factory=list)
    weights: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    notes: dict[str, Any] = field(default_factory=dict)  # provenance, figures
    gate_up: str = "exact"  # how quantised (MatMulNBits) gate/up weights are fused

    def downs(self) -> dict[tuple[int, int], np.ndarray]:
        """The refitted down projections by (first, last) layer."""
        return {(r.first, r.last): self.weights[r.key] for r in self.runs if r.heal != "none"}

    def linear(self) -> list[tuple[int, int]]:
        """Runs whose refit also reads the normalised run input (a linear attention stand-in)."""
        return [(r.first, r.last) for r in self.runs if r.heal == "linear"]

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "version": VERSION,
            "source": {**asdict(self.source), "intermediate": list(self.source.intermediate)},
            "attention_removed": sorted(self.attention_removed),
            "gate_up": self.gate_up,
            "runs": [
                {"layers": [r.first, r.last], "heal": r.heal, "target": r.target, "lambda": r.lam}
                for r in self.runs
            ],
            "notes": self.notes,
        }

    def describe(self) -> str:
        runs = ", ".join(f"{r.first}-{r.last}" + (" (healed)" if r.heal != "none" else "")
                         for r in self.runs)  # fmt: skip
        removed = ", ".join(map(str, self.attention_removed)) or "none"
        return f"attention removed: {removed}; runs fused: {runs or 'none'}"


# -- from a model ----------------------------------------------------------------------------------


def source_of(found: Inspection) -> Source:
    """Shapes and gain digest of an inspected model."""
    import ml_dtypes

    from graphfuse.passes.fuse_ffn import gain_of

    if not found.blocks:
        raise GraphfuseError("no FFN blocks found: a plan needs a model graphfuse recognises")
    digest = hashlib.sha256()
    for block in found.blocks:
        gain = gain_of(found.model.graph.initializers, block).astype(ml_dtypes.bfloat16)
        digest.update(gain.tobytes())
    return Source(
        layers=len(found.blocks),
        hidden=found.blocks[0].hidden,
        intermediate=tuple(b.intermediate for b in found.blocks),
        digest=digest.hexdigest()[:16],
    )


def attention_absent(found: Inspection) -> list[int]:
    """Layers of a model that has attention somewhere but not before these FFN blocks: the
    attention a plan made on this model records as removed."""
    from graphfuse.passes.drop_attention import find_attention

    present = find_attention(found.model, found.blocks)
    if not present:  # an FFN-only graph: nothing was removed, there is nothing to remove
        return []
    return [b.index for b in found.blocks if b.index not in present and b.index > 0]


# -- files -----------------------------------------------------------------------------------------


def weights_path(path: Path) -> Path:
    return path.with_suffix(".safetensors")


def check_path(path: str | os.PathLike) -> Path:
    """Where a plan may be written: a .json name in an existing folder (checked before work)."""
    path = Path(path)
    if path.suffix != ".json":
        raise GraphfuseError(f"plan file {path} must end in .json (the weights go beside it)")
    if not path.parent.is_dir():
        raise GraphfuseError(f"folder {path.parent} does not exist: create it first")
    return path


def save(plan: Plan, path: str | os.PathLike) -> Path:
    """Write ``path`` (JSON) and, when the plan holds weights, ``path.safetensors`` beside it,
    both atomically (the weights first, so a JSON on disk always has its weights)."""
    from safetensors.numpy import save_file

    from graphfuse.onnx_io import atomic_output

    path = check_path(path)
    data = plan.as_dict()
    missing = [r.key for r in plan.runs if r.heal != "none" and r.key not in plan.weights]
    assert not missing, missing
    if plan.weights:
        arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in plan.weights.items()}
        with atomic_output(weights_path(path)) as tmp:
            save_file(arrays, str(tmp), metadata={"schema": SCHEMA, "version": str(VERSION)})
        data["weights"] = weights_path(path).name
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path


def load(path: str | os.PathLike) -> Plan:
    """Read a plan, checking its schema, version and internal consistency."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise GraphfuseError(f"plan {path} does not exist or is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphfuseError(
            f"plan {path} is not JSON ({e}): pass a plan that graphfuse wrote"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise GraphfuseError(f'{path} is not a graphfuse plan (no "schema": "{SCHEMA}")')
    if data.get("version") != VERSION:
        raise GraphfuseError(
            f"plan {path} has schema version {data.get('version')}; this graphfuse reads "
            f"version {VERSION}: recreate the plan with this version"
        )
    try:
        s = data["source"]
        source = Source(_int(s["layers"]), _int(s["hidden"]),
                        tuple(_int(i) for i in s["intermediate"]), str(s["digest"]))  # fmt: skip
        runs = []
        for r in data["runs"]:
            first, last = (_int(j) for j in r["layers"])
            lam = r.get("lambda")
            runs.append(RunPlan(first, last, str(r["heal"]), r.get("target"),
                                None if lam is None else float(lam)))  # fmt: skip
            if first >= last:
                raise ValueError(f"run {first}-{last}")
        plan = Plan(source, [_int(j) for j in data["attention_removed"]], runs,
                    notes=data.get("notes", {}), gate_up=str(data.get("gate_up", "exact")))  # fmt: skip
        if not isinstance(data.get("weights") or "", str):
            raise ValueError("weights")
    except (KeyError, TypeError, IndexError, ValueError) as e:
        raise GraphfuseError(f"plan {path} lacks or mangles the field {e}: it is damaged") from None
    if data.get("weights"):
        weights = path.parent / data["weights"]
        if Path(data["weights"]).name != data["weights"] or not weights.is_file():
            raise GraphfuseError(
                f"plan {path} names weights {data['weights']} that are not beside it"
            )
        try:
            plan.weights = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise GraphfuseError(f"cannot read the plan's weights {weights}: {e}") from None
    _check_consistent(plan, path)
    return plan


def _int(value: Any) -> int:
    """A whole number from JSON (not a string, a float or a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{value!r} is not a whole number")
    return value


def _check_consistent(plan: Plan, path: Path | str) -> None:
    if plan.gate_up not in GATE_UP:
        raise GraphfuseError(
            f"plan {path} has gate_up '{plan.gate_up}'; this graphfuse knows {', '.join(GATE_UP)}"
        )
    n = plan.source.layers
    named = [*plan.attention_removed, *(j for r in plan.runs for j in (r.first, r.last))]
    if bad := [j for j in named if not 0 <= j < n]:
        raise GraphfuseError(
            f"plan {path} names layer {bad[0]}, but its model has layers 0-{n - 1}: it is damaged"
        )
    for r in plan.runs:
        if r.heal not in HEALS:
            raise GraphfuseError(
                f"plan {path}: run {r.first}-{r.last} has heal '{r.heal}'; this graphfuse "
                f"knows {', '.join(HEALS)}"
            )
        if r.heal != "none":
            w = plan.weights.get(r.key)
            width = sum(plan.source.intermediate[r.first : r.last + 1])
            width += plan.source.hidden if r.heal == "linear" else 0
            if w is None or w.shape != (width, plan.source.hidden):
                got = "none" if w is None else list(w.shape)
                raise GraphfuseError(
                    f"plan {path}: the weights of run {r.first}-{r.last} are {got}, not "
                    f"[{width}, {plan.source.hidden}]: the weights file is not this plan's"
                )


# -- applying --------------------------------------------------------------------------------------


def check_source(
    plan: Plan, found: Inspection | Source, name: str, what: str = "the model it was made on"
) -> None:
    """Refuse a model that is not the one the plan was made on (shapes or gains differ);
    ``what`` names what to apply the plan to instead."""
    have = found if isinstance(found, Source) else source_of(found)
    want = plan.source
    if (
        have.layers < want.layers
        and max([*plan.attention_removed, *(r.last for r in plan.runs)], default=-1) >= have.layers
    ):
        raise GraphfuseError(
            f"the plan names layers up to {want.layers - 1}, but {name} has {have.layers} "
            f"layers: apply it to {what} ({want.describe()})"
        )
    if (have.layers, have.hidden, have.intermediate) != (
        want.layers, want.hidden, want.intermediate
    ):  # fmt: skip
        raise GraphfuseError(
            f"the plan was made on a model of {want.describe()}; {name} has "
            f"{have.describe()}: apply it to {what}"
        )
    if have.digest != want.digest:
        raise GraphfuseError(
            f"{name} has the plan's shapes but other weights (norm-gain digest {have.digest}, "
            f"the plan's {want.digest}): apply it to {what}"
        )


def apply(
    plan: Plan | str | os.PathLike,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    to: str | None = None,
    dtype: str = "float32",
    progress: bool = False,
):
    """Rebuild ``plan``'s result from ``source`` into ``output``, without recomputing it.

    - ``to="onnx"``: an .onnx file (or a folder's model) in, a file out; returns the fusion report.
    - ``to="genai"`` (the default for a folder): an onnxruntime-genai folder in, one out.
    - ``to="nemotron-nas"``: the Hugging Face Llama folder (or GGUF) the model was built from in,
      a nemotron-nas checkpoint folder out, in ``dtype``; returns its ``Checkpoint``.
    """
    from graphfuse import api, genai

    if not isinstance(plan, Plan):
        plan = load(plan)
    else:
        _check_consistent(plan, "given")
    if to == "nemotron-nas":
        from graphfuse.formats import nemotron_nas

        return nemotron_nas.write(plan, source, output, dtype=dtype, progress=progress)
    is_folder = genai.is_folder(source)
    to = to or ("genai" if is_folder else "onnx")
    if to not in TARGETS:
        raise GraphfuseError(f"--to {to}: choose one of {', '.join(TARGETS)}")
    if to == "genai" and not is_folder:
        raise GraphfuseError(
            f"--to genai needs an onnxruntime-genai folder as SOURCE ({source} is a file): "
            "build one with python -m onnxruntime_genai.models.builder"
        )
    if to == "onnx" and is_folder:
        source = api.model_path(source)
    name = str(source)

    def transform(proto, base_dir):
        from graphfuse.passes.drop_attention import drop_attention, find_attention

        found = api.inspect(proto, base_dir)
        check_source(plan, found, name)
        present = find_attention(found.model, found.blocks)
        drop = [j for j in plan.attention_removed if j in present]
        if drop:
            proto, _ = drop_attention(proto, drop, base_dir)
        runs = [(r.first, r.last) for r in plan.runs]
        return api._fuse(proto, runs, None, False, progress, base_dir, downs=plan.downs(),
                         requantize=plan.gate_up == "requantized", linear=plan.linear())  # fmt: skip

    return api._transform_file(source, output, transform, check=True)
