"""Does vLLM serve a plan as ONNX Runtime computes it? One plan, one Hugging Face Llama folder:

    apply --to nemotron-nas   → served by vLLM on the CPU (tools/vllm/probe.py, in .venv-vllm)
    builder fp32 + apply      → the same plan in ONNX Runtime (an onnxruntime-genai fp32 folder)

and the two compared on the same token ids: the log-probability of every prompt token, the
greedy continuation (onnxruntime-genai generating, vLLM generating), and perplexity.

    python tools/vllm/check.py PLAN.json HF_DIR [--work DIR] [--tp 1 2] [--prompts 3]

Runs in the project's environment; vLLM runs in its own (``bash tools/vllm/setup_env.sh``;
``GRAPHFUSE_VLLM_PYTHON`` names another interpreter). Prints one line per TP size and writes
``DIR/check.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("probe.py")
PROMPT_TEXT = (  # three English passages of more than 64 tokens each, none from the text sets
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a can of "
    "oil and a cloth for the great lens. From the gallery he could see the fishing boats "
    "returning to the harbour, their lanterns swaying with the swell, and beyond them the dark "
    "line of the storm that the barometer had promised since noon. He trimmed the wick, "
    "polished the glass, and wrote the time in the log.",
    "To bake a simple loaf of bread, dissolve the yeast in warm water with a pinch of sugar and "
    "wait until it foams. Mix the flour and salt in a large bowl, pour in the yeast and a "
    "little olive oil, and knead the dough for ten minutes until it is smooth and elastic. "
    "Leave it covered in a warm place for an hour, shape it, let it rise again, and bake it in "
    "a hot oven until the crust sounds hollow when tapped.",
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light "
    "energy into chemical energy. Inside the chloroplasts, chlorophyll absorbs mostly red and "
    "blue light; the energy splits water molecules, releasing oxygen, and drives the synthesis "
    "of sugars from carbon dioxide in a cycle of reactions named after Melvin Calvin, who "
    "mapped it with radioactive carbon in the years after the Second World War.",
)


def vllm_python() -> Path | None:
    """The interpreter of vLLM's environment, if it exists."""
    given = os.environ.get("GRAPHFUSE_VLLM_PYTHON")
    path = Path(given) if given else ROOT / ".venv-vllm" / "bin" / "python"
    return path if path.is_file() else None


def probe(model: Path, prompts: list[list[int]], *, tp: int = 1, max_tokens: int = 16,
          out: Path | None = None) -> dict:  # fmt: skip
    """vLLM's prompt log-probs, top-2 and greedy continuation for ``prompts`` (token ids)."""
    python = vllm_python()
    if python is None:
        raise RuntimeError("vLLM's environment is missing: run bash tools/vllm/setup_env.sh")
    with tempfile.TemporaryDirectory() as tmp:
        ids = Path(tmp) / "prompts.json"
        ids.write_text(json.dumps(prompts))
        result = out or Path(tmp) / "probe.json"
        cmd = [str(python), str(PROBE), str(model), "--out", str(result), "--tp", str(tp),
               "--prompts", str(ids), "--max-tokens", str(max_tokens), "--trust-remote-code"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"vLLM failed on {model} (tp={tp}): {tail}")
        return json.loads(result.read_text())


def onnx_logprobs(folder: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ONNX Runtime on an onnxruntime-genai folder, one prefill of ``ids``: the log-prob of each
    next token (positions 1..n-1), the top-1 token and the top-1 − top-2 margin there."""
    import onnx

    from graphfuse import evaluate, genai

    path = genai.model_file(folder)
    session = evaluate.make_session(str(path))
    model = onnx.load(str(path), load_external_data=False)
    logits = session.run(["logits"], genai.prefill_feeds(folder, model, np.array([ids])))[0][0]
    logits = logits[:-1].astype(np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    top = np.sort(logp, -1)[:, -2:]
    return logp[np.arange(len(ids) - 1), ids[1:]], logp.argmax(-1), top[:, 1] - top[:, 0]


def prompts_for(hf_dir: Path, count: int = 3) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    return [tokenizer(text)["input_ids"] for text in PROMPT_TEXT[:count]]


def build(plan: Path, hf_dir: Path, work: Path) -> tuple[Path, Path]:
    """The plan applied to ``hf_dir`` twice: a nemotron-nas checkpoint, and an onnxruntime-genai
    fp32 build of the same folder (made by the builder once, kept in ``work``)."""
    from graphfuse import plan as plans
    from graphfuse.models import genai_build

    fp32 = work / "genai-fp32"
    if not (fp32 / "genai_config.json").is_file():
        genai_build.build(hf_dir, fp32, "fp32")
    fused, nas = work / "genai-fp32-applied", work / "nemotron-nas"
    for path, to in ((fused, "genai"), (nas, "nemotron-nas")):
        if not path.is_dir():
            plans.apply(plan, fp32 if to == "genai" else hf_dir, path, to=to)
    return fused, nas


def compare(onnx_folder: Path, nas: Path, prompts: list[list[int]], tps=(1,),
            max_tokens: int = 16) -> dict:  # fmt: skip
    """vLLM (each TP size) against ONNX Runtime / onnxruntime-genai on the same prompts."""
    from graphfuse.models import genai_build

    ort = [onnx_logprobs(onnx_folder, p) for p in prompts]
    greedy = [genai_build.generate(onnx_folder, p, max_tokens) for p in prompts]
    ort_nll = -np.concatenate([lp for lp, _, _ in ort])
    rows = {}
    for tp in tps:
        served = probe(nas, prompts, tp=tp, max_tokens=max_tokens)
        diffs, ties, top1 = [], 0, []
        for (lp, argmax, margin), got in zip(ort, served["prompts"], strict=True):
            diffs.append(np.abs(np.asarray(got["prompt_logprobs"]) - lp))
            clear = margin > 1e-3  # random weights give near-ties: compare where it is clear
            ties += int((~clear).sum())
            vtop = np.array([t[0][0] for t in got["prompt_top2"]])
            top1.append((vtop == argmax)[clear])
        vllm_nll = -np.concatenate([np.asarray(p["prompt_logprobs"]) for p in served["prompts"]])
        rows[tp] = {
            "logprob_mean_abs_diff": [float(d.mean()) for d in diffs],
            "logprob_max_abs_diff": float(max(d.max() for d in diffs)),
            "top1_agreement_where_clear": float(np.concatenate(top1).mean()),
            "near_ties": ties,
            "greedy_identical": [
                g == p["output_token_ids"] for g, p in zip(greedy, served["prompts"], strict=True)
            ],
            "perplexity_vllm": float(np.exp(vllm_nll.mean())),
            "perplexity_onnx": float(np.exp(ort_nll.mean())),
            "widths": served["widths"],
            "attention_no_op": served["attention_no_op"],
            "prompts": served["prompts"],
        }
        rows[tp]["perplexity_rel_diff"] = abs(rows[tp]["perplexity_vllm"] / rows[tp]["perplexity_onnx"] - 1)  # fmt: skip
    return {"prompt_tokens": [len(p) for p in prompts], "greedy_onnx": greedy, "tp": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("plan", type=Path)
    p.add_argument(
        "hf_dir", type=Path, help="the Hugging Face Llama folder the plan's model came from"
    )
    p.add_argument("--work", type=Path, help="folder for the builds (default: a new temporary one)")
    p.add_argument("--tp", type=int, nargs="+", default=[1], choices=(1, 2))
    p.add_argument("--prompts", type=int, default=3, choices=(1, 2, 3))
    args = p.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="graphfuse-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_folder, nas = build(args.plan, args.hf_dir, work)
    prompts = prompts_for(args.hf_dir, args.prompts)
    result = compare(onnx_folder, nas, prompts, args.tp)
    (work / "check.json").write_text(json.dumps(result, indent=1))
    print(f"prompts of {result['prompt_tokens']} tokens; nemotron-nas {nas} against {onnx_folder}")
    for tp, r in result["tp"].items():
        means = ", ".join(f"{m:.2e}" for m in r["logprob_mean_abs_diff"])
        print(f"tp={tp}: prompt log-prob mean |Δ| {means} (max {r['logprob_max_abs_diff']:.2e}); "
              f"16 greedy tokens identical: {r['greedy_identical']}; perplexity vLLM "
              f"{r['perplexity_vllm']:.4f} vs ONNX Runtime {r['perplexity_onnx']:.4f} "
              f"({100 * r['perplexity_rel_diff']:.3f}%)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
