"""Where FFN Fusion's gain lives: vLLM decode at tensor-parallel sizes 1 and 2, original against
attention-removed and against fused + attention-removed, on a SmolLM2-shaped model.

    python tools/vllm/bench_tp.py [--plan PLAN.json] [--work DIR] [--rounds 5] [--tp 1 2]

The model has SmolLM2-135M's shape (30 layers, H=576, I=1536) with 18 heads of 32 and 6 KV heads
(SmolLM2's 9 do not divide by 2) and random weights: timing does not depend on them. The layout
is the demo's plan's (default: attention of layers 3, 6, 7, 9, 14, 17, 22, 25, 26, 28 removed;
runs 2-3, 5-7, 8-9, 13-14, 16-17, 21-22, 24-26, 27-28 fused: 30 → 20 FFN stages). Each of the
three is written by ``graphfuse apply --to nemotron-nas`` and served by vLLM on the CPU
(``tools/vllm/bench_engines.py``: all engines up, rounds interleaved); 128 new tokens after a
128-token prompt, batch 1, greedy. Under tensor parallelism every FFN stage ends in an
all-reduce, so each fused stage is one all-reduce fewer. Prints medians and ratios; writes
``DIR/bench_tp.json`` and ``DIR/bench_tp.png``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from check import vllm_python  # noqa: E402

REMOVED = [3, 6, 7, 9, 14, 17, 22, 25, 26, 28]
RUNS = [(2, 3), (5, 7), (8, 9), (13, 14), (16, 17), (21, 22), (24, 26), (27, 28)]


def build(work: Path, plan_path: Path | None) -> dict[str, Path]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from graphfuse import plan as plans
    from graphfuse.formats import nemotron_nas

    hf = work / "hf"
    if not (hf / "config.json").is_file():
        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                             num_hidden_layers=30, num_attention_heads=18, num_key_value_heads=6,
                             max_position_embeddings=2048, tie_word_embeddings=True,
                             rms_norm_eps=1e-5)  # fmt: skip
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(hf)
    removed, runs = REMOVED, RUNS
    if plan_path is not None:
        chosen = plans.load(plan_path)
        removed, runs = chosen.attention_removed, [(r.first, r.last) for r in chosen.runs]
    source = nemotron_nas.source_of(hf)
    layouts = {
        "original": plans.Plan(source),
        "attention removed": plans.Plan(source, list(removed)),
        "fused + attention removed": plans.Plan(source, list(removed),
                                                [plans.RunPlan(a, b) for a, b in runs]),
    }  # fmt: skip
    folders = {}
    for name, plan in layouts.items():
        folder = work / name.replace(" + ", "-").replace(" ", "-")
        if not folder.is_dir():
            nemotron_nas.write(plan, hf, folder)
        folders[name] = folder
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--plan", type=Path, help="take the layout from this plan (any model's)")
    p.add_argument("--work", type=Path)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    args = p.parse_args(argv)
    python = vllm_python()
    if python is None:
        print("bench_tp.py: vLLM's environment is missing: bash tools/vllm/setup_env.sh",
              file=sys.stderr)  # fmt: skip
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="graphfuse-bench-tp-"))
    work.mkdir(parents=True, exist_ok=True)
    folders = build(work, args.plan)
    results = {}
    for tp in args.tp:
        out = work / f"tp{tp}.json"
        cmd = [str(python), str(HERE / "bench_engines.py"), *map(str, folders.values()),
               "--out", str(out), "--tp", str(tp), "--rounds", str(args.rounds)]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print((proc.stderr.strip().splitlines() or ["failed"])[-1], file=sys.stderr)
            return 1
        timed = json.loads(out.read_text())["models"]
        results[tp] = {name: timed[str(f)] for name, f in folders.items()}
    summary = {}
    print("vLLM decode, batch 1, 128 new tokens after 128, SmolLM2-shaped, random weights "
          f"(medians of {args.rounds} interleaved rounds)")  # fmt: skip
    for tp, by_model in results.items():
        med = {name: float(np.median(v)) for name, v in by_model.items()}
        base, removed = med["original"], med["attention removed"]
        fused = med["fused + attention removed"]
        summary[tp] = {"median_tok_s": med, "rounds": by_model,
                       "fused_vs_original": fused / base, "fused_vs_removed": fused / removed,
                       "removed_vs_original": removed / base}  # fmt: skip
        print(f"tp={tp}: " + ", ".join(f"{n} {v:.1f} tok/s" for n, v in med.items())
              + f"; fused + removed vs original {fused / base:.2f}×, vs removed "
              f"{fused / removed:.2f}× (fusion alone)")  # fmt: skip
    (work / "bench_tp.json").write_text(json.dumps(summary, indent=1))
    _plot(summary, work / "bench_tp.png")
    print(f"wrote {work / 'bench_tp.json'} and {work / 'bench_tp.png'}")
    return 0


def _plot(summary: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["original", "attention removed", "fused + attention removed"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [t + (i - 1) * width for t in range(len(summary))]
        values = [s["median_tok_s"][name] for s in summary.values()]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(summary)), [
        f"tensor parallel {tp}\nfused vs removed {s['fused_vs_removed']:.2f}×"
        for tp, s in summary.items()
    ])  # fmt: skip
    ax.set_ylabel("decode tokens/s (median)")
    ax.set_ylim(0, 1.15 * max(max(s["median_tok_s"].values()) for s in summary.values()))
    ax.set_title("vLLM on 2 CPU cores, SmolLM2-shaped, batch 1", fontsize=10)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, -0.32), ncol=3, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
