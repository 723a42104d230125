"""Latency in onnxruntime-genai, the runtime these model folders are deployed with.

Method, per intra-op thread setting (None: the runtime's default, which onnxruntime-genai sets
to half the logical CPUs, at least 1 and at most 16, not ONNX Runtime's one per physical core;
an int: that many threads, set through the config overlay
``model.decoder.session_options.intra_op_num_threads``, so the folder on disk is never written):
- every model is loaded once and kept for all its trials; CPU only (refused otherwise);
- a decode trial appends a fixed prompt of `prompt` token ids (prefill, untimed), then times
  `new` greedy decode steps: each ``generate_next_token`` runs the model on the last token and
  picks the next one (the first token comes from the prompt's logits and is taken untimed);
  ``min_length`` = ``max_length`` so an end-of-sequence token never stops it early;
- a prefill trial times ``append_tokens`` of `prefill` ids plus reading the first logits;
- one warm-up trial per model, then `rounds` rounds, each running every model's decode and
  prefill trial, round-robin with the order rotated every round (A B C, B C A, C A B, ...), so
  drift hits all models alike;
- reported: median and p90 of each time, decode tokens/s (`new` / time), and speed ratios of the
  medians (time of the other model / time of this one: > 1 means this one is faster) against
  the baseline (the first folder) and between every pair.
Output: `format_table`, `LatencyReport.as_dict` / `to_json`, `plot` (matplotlib, lazily).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from graphfuse import genai
from graphfuse.errors import GraphfuseError
from graphfuse.latency import TimingStats, dump_json

KINDS = ("decode", "prefill")


def load(folder: str | Path, threads: int | None = None) -> Any:
    """An ``og.Model`` of `folder` on the CPU with `threads` intra-op threads (None: default)."""
    import onnxruntime_genai as og

    genai.read_config(Path(folder))  # a clear error for a folder that is not a genai build
    config = og.Config(str(folder))
    if threads is not None:
        if threads < 1:
            raise GraphfuseError("threads must be >= 1 (or None for the runtime's default)")
        options = {"session_options": {"intra_op_num_threads": int(threads)}}
        config.overlay(json.dumps({"model": {"decoder": options}}))  # in memory only
    model = og.Model(config)
    if model.device_type != "CPU":
        raise GraphfuseError(f"{folder} loads on {model.device_type}; this harness times the CPU")
    return model


def _generator(model: Any, length: int) -> Any:
    import onnxruntime_genai as og

    params = og.GeneratorParams(model)
    params.set_search_options(max_length=length, min_length=length, do_sample=False, batch_size=1)
    return og.Generator(model, params)


def decode_seconds(model: Any, prompt_ids: np.ndarray, new: int) -> float:
    """Seconds of `new` greedy decode steps after the prefill of `prompt_ids`."""
    generator = _generator(model, len(prompt_ids) + new + 1)
    generator.append_tokens(prompt_ids)  # runs the prompt and computes its logits
    generator.generate_next_token()  # picks token 1 from those logits: no model run
    start = time.perf_counter()
    for _ in range(new):
        generator.generate_next_token()  # the model on the last token, then the greedy pick
    return time.perf_counter() - start


def prefill_seconds(model: Any, ids: np.ndarray) -> float:
    """Seconds of the prefill of `ids`, the first logits read back."""
    generator = _generator(model, len(ids) + 1)
    start = time.perf_counter()
    generator.append_tokens(ids)
    generator.get_logits()
    return time.perf_counter() - start


@dataclass(frozen=True)
class Result:
    model: str
    threads: int | None  # None: the runtime's default
    decode: TimingStats  # milliseconds of `new` decode steps
    prefill: TimingStats  # milliseconds of one prefill
    new: int

    @property
    def tokens_per_s(self) -> float:
        return self.new / self.decode.median_ms * 1e3

    @property
    def tokens_per_s_p90(self) -> float:  # at the p90 decode time: the slow tail
        return self.new / self.decode.p90_ms * 1e3


def default_threads() -> int:
    """The intra-op threads onnxruntime-genai gives a session that does not set them."""
    return min(16, max(1, (os.cpu_count() or 2) // 2))  # as Model::CreateSessionOptionsFromConfig


def threads_label(threads: int | None) -> str:
    if threads is None:
        return f"default threads ({default_threads()})"
    return f"{threads} thread{'s' * (threads != 1)}"


@dataclass
class LatencyReport:
    folders: dict[str, str]
    threads: tuple[int | None, ...]
    prompt: int
    new: int
    prefill: int
    rounds: int
    results: list[Result] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> str:
        return next(iter(self.folders))

    def result(self, model: str, threads: int | None) -> Result:
        return next(r for r in self.results if r.model == model and r.threads == threads)

    def ratio(self, model: str, over: str, threads: int | None, kind: str = "decode") -> float:
        """Speed of `model` relative to `over`: median time of `over` / median time of `model`."""
        times = [getattr(self.result(m, threads), kind).median_ms for m in (over, model)]
        return times[0] / times[1]

    def pairs(self) -> list[tuple[str, str]]:
        """(model, over) for every later model over every earlier one, baseline pairs first."""
        return [(b, a) for a, b in combinations(self.folders, 2)]

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for result, entry in zip(self.results, data["results"], strict=True):
            entry["tokens_per_s"] = result.tokens_per_s
            entry["tokens_per_s_p90"] = result.tokens_per_s_p90
        data["baseline"] = self.baseline
        data["ratios"] = {
            threads_label(t): {
                f"{model} vs {over}": {k: self.ratio(model, over, t, k) for k in KINDS}
                for model, over in self.pairs()
            }
            for t in self.threads
        }
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        return dump_json(self.as_dict(), path)


def compare(
    folders: Mapping[str, str | Path],
    *,
    threads: Sequence[int | None] = (None, 1),
    rounds: int = 10,
    prompt: int = 128,
    new: int = 128,
    prefill: int = 512,
    ids: np.ndarray | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> LatencyReport:
    """Time onnxruntime-genai folders (name -> folder; the first is the baseline) against each
    other; see the module docstring for the method. `ids`: the token ids the prompt and the
    prefill take from their start (default: drawn with `seed` from the smallest vocabulary)."""
    import onnxruntime_genai as og

    if not folders or rounds < 1 or min(prompt, new, prefill) < 1:
        raise GraphfuseError("need at least one folder, one round and positive token counts")
    configs = {name: genai.read_config(Path(path))["model"] for name, path in folders.items()}
    longest = max(prompt + new, prefill) + 1
    for name, model_config in configs.items():
        if model_config.get("context_length", longest) < longest:
            raise GraphfuseError(
                f"{name}: context_length {model_config['context_length']} is shorter than the "
                f"{longest} tokens a trial needs; lower prompt, new or prefill"
            )
    if ids is None:
        vocab = min(int(c["vocab_size"]) for c in configs.values())
        ids = np.random.default_rng(seed).integers(0, vocab, max(prompt, prefill))
    ids = np.asarray(ids, dtype=np.int32).ravel()
    if ids.size < max(prompt, prefill):
        raise GraphfuseError(f"ids holds {ids.size} tokens; need {max(prompt, prefill)}")

    report = LatencyReport(
        folders={name: str(path) for name, path in folders.items()},
        threads=tuple(threads),
        prompt=prompt,
        new=new,
        prefill=prefill,
        rounds=rounds,
        machine={
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "default_threads": default_threads(),
            "onnxruntime_genai": og.__version__,
        },
    )
    names = list(folders)
    disable = None if progress is None else not progress  # None: a bar only on a terminal
    total = len(report.threads) * (rounds + 1) * len(names)
    with tqdm(total=total, desc="genai latency", unit="trial", leave=False, disable=disable) as bar:
        for t in report.threads:
            models = {name: load(folders[name], t) for name in names}
            times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in KINDS} for n in names}
            for index in range(rounds + 1):  # round 0 is the warm-up
                for name in names[index % len(names) :] + names[: index % len(names)]:
                    decode = decode_seconds(models[name], ids[:prompt], new)
                    first = prefill_seconds(models[name], ids[:prefill])
                    if index > 0:
                        times[name]["decode"].append(decode * 1e3)
                        times[name]["prefill"].append(first * 1e3)
                    bar.update()
            report.results += [
                Result(
                    name,
                    t,
                    TimingStats.of(times[name]["decode"]),
                    TimingStats.of(times[name]["prefill"]),
                    new,
                )
                for name in names
            ]
            del models
    return report


def format_table(report: LatencyReport) -> str:
    """Per thread setting: decode tokens/s and prefill ms (median, p90) with speed ratios."""
    base = report.baseline
    width = max(len(name) for name in report.folders) + 2
    lines = [
        f"onnxruntime-genai {report.machine.get('onnxruntime_genai', '?')} on the CPU, batch 1: "
        f"decode {report.new} tokens after a {report.prompt}-token prompt, prefill "
        f"{report.prefill} tokens; {report.rounds} interleaved rounds",
    ]
    columns = ("decode med", "p90", f"vs {base}", "prefill med", "p90", f"vs {base}")
    cell = max(14, *(len(c) + 1 for c in columns))
    for t in report.threads:
        header = f"{'model':<{width}}" + "".join(c.rjust(cell) for c in columns)
        lines += ["", threads_label(t), header, "-" * len(header)]
        for name in report.folders:
            r = report.result(name, t)
            cells = (
                f"{r.tokens_per_s:.1f} tok/s",
                f"{r.tokens_per_s_p90:.1f} tok/s",
                f"{report.ratio(name, base, t):.2f}×",
                f"{r.prefill.median_ms:.1f} ms",
                f"{r.prefill.p90_ms:.1f} ms",
                f"{report.ratio(name, base, t, 'prefill'):.2f}×",
            )
            lines.append(f"{name:<{width}}" + "".join(c.rjust(cell) for c in cells))
        for model, over in report.pairs():
            if over != base:
                lines.append(
                    f"  {model} vs {over}: decode {report.ratio(model, over, t):.2f}×, "
                    f"prefill {report.ratio(model, over, t, 'prefill'):.2f}×"
                )
    lines += [
        "",
        "p90 of decode: tokens/s at the p90 time (the slow tail); × = median time of the other "
        "model / this model's (> 1: this one is faster)",
    ]
    return "\n".join(lines)


def plot(report: LatencyReport, png_path: str | Path) -> Path:
    """Bars per model (median, whisker to the p90), one column per thread setting: decode
    tokens/s on top, prefill ms below; the speed ratio against the baseline on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, count = list(report.folders), len(report.threads)
    fig, axes = plt.subplots(
        2,
        count,
        figsize=(1.1 * len(names) * count + 1.6, 6.4),
        squeeze=False,
        sharey="row",
        constrained_layout=True,
    )
    colors = ["#95a5a6", "#2e86c1", "#28b463", "#d68910", "#8e44ad"]
    for column, t in enumerate(report.threads):
        results = [report.result(name, t) for name in names]
        panels = (
            (
                "decode",
                [r.tokens_per_s for r in results],
                [[r.tokens_per_s - r.tokens_per_s_p90 for r in results], [0] * len(results)],
            ),
            (
                "prefill",
                [r.prefill.median_ms for r in results],
                [[0] * len(results), [r.prefill.p90_ms - r.prefill.median_ms for r in results]],
            ),
        )
        for row, (kind, heights, whiskers) in enumerate(panels):
            ax = axes[row][column]
            ax.bar(
                names,
                heights,
                yerr=whiskers,
                capsize=4,
                color=[colors[i % len(colors)] for i in range(len(names))],
            )
            ratios = [report.ratio(name, report.baseline, t, kind) for name in names]
            for x, ratio in enumerate(ratios):  # at the base of the bar, clear of the whiskers
                ax.text(
                    x,
                    0.03,
                    f"{ratio:.2f}×",
                    transform=ax.get_xaxis_transform(),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    color="white",
                    fontweight="bold",
                )
            what = (
                f"decode, {report.new} tokens"
                if kind == "decode"
                else (f"prefill, {report.prefill} tokens")
            )
            ax.set_title(f"{what}\n{threads_label(t)}", fontsize=9)
            ax.tick_params(axis="x", labelsize=8, labelrotation=20)
            ax.tick_params(axis="y", labelsize=8)
    top = max(r.tokens_per_s for r in report.results)
    axes[0][0].set_ylim(0, top * 1.12)  # rows share their scale: thread settings compare
    axes[0][0].set_ylabel("tokens/s (whisker: at p90 time)", fontsize=8)
    axes[1][0].set_ylabel("ms (whisker: p90)", fontsize=8)
    fig.suptitle(
        f"onnxruntime-genai CPU, batch 1, {report.rounds} interleaved rounds; "
        f"on bars: speed vs {report.baseline}",
        fontsize=9,
    )
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


__all__ = [
    "LatencyReport",
    "Result",
    "amdahl",
    "compare",
    "decode_seconds",
    "default_threads",
    "format_table",
    "load",
    "plot",
    "prefill_seconds",
    "threads_label",
]


def amdahl(
    removed: str | Path,
    fused: str | Path,
    *,
    past: int = 128,
    steps: int = 40,
    threads: int | None = None,
) -> dict[str, float]:
    """What the fused segments save in one decode step, from ONNX Runtime's per-node profile of
    each folder's model (one token after ``past`` cached ones, ``steps`` runs), and the bound
    that puts on the whole step (Amdahl): nodes only the attention-removed model has are the
    runs it computes one block after another; nodes only the fused one has are the wide FFNs
    that replace them."""
    a, b = (_profile(Path(f), past, steps, threads) for f in (removed, fused))
    only_a = sum(t for n, t in a["nodes"].items() if n not in b["nodes"])
    only_b = sum(t for n, t in b["nodes"].items() if n not in a["nodes"])
    saved = only_a - only_b
    return {
        "step_ms_removed": a["step"],
        "step_ms_fused": b["step"],
        "segments_ms_removed": only_a,
        "segments_ms_fused": only_b,
        "segment_speedup": only_a / only_b if only_b else math.inf,
        "segment_share": only_a / a["step"],
        "bound": a["step"] / (a["step"] - saved),
        "measured": a["step"] / b["step"],
    }


def _profile(folder: Path, past: int, steps: int, threads: int | None) -> dict:
    """Mean milliseconds per decode step and per node (ONNX Runtime's profiler, all
    optimisations on, CPU)."""
    import onnxruntime as ort

    from graphfuse import genai

    path = genai.model_file(folder)
    decoder = genai.read_config(folder)["model"]["decoder"]
    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="graphfuse-profile-")) / "p")
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = np.array([[1]], np.int64)
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((1, past + 1), np.int64)
        elif arg.name == "position_ids":
            feeds[arg.name] = np.array([[past]], np.int64)
        elif arg.name.startswith("past"):
            shape = (1, decoder["num_key_value_heads"], past, decoder["head_size"])
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    for _ in range(5):  # warm-up, profiled too: dropped below by counting runs
        session.run(None, feeds)
    for _ in range(steps):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    events = json.loads(trace.read_text())
    shutil.rmtree(trace.parent, ignore_errors=True)
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    kept = runs[5:]
    start = kept[0]["ts"]
    nodes: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            name = e["name"].removesuffix("_kernel_time")
            nodes[name] = nodes.get(name, 0.0) + e["dur"] / 1000 / len(kept)
    return {"step": sum(e["dur"] for e in kept) / 1000 / len(kept), "nodes": nodes}
