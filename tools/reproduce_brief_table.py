"""Reproduce the table of BRIEF section 6 through the pipeline (`graphfuse.pipeline`): for each
run a..b of SmolLM2-135M (onnxruntime-genai's fp32 build), remove the attention of layers
a+1..b, fuse FFN blocks a..b, then repair or heal the fused down projection; perplexity after
each step on 4 × 512 tokens of held-out standard-library docstrings (the brief's text) and on
4 × 512 tokens of Vim's user manual (the test text, which nothing else touches).

    python tools/reproduce_brief_table.py [--runs 3-5,3-7,10-12,14-17,24-28]
        [--calibration-windows 48] [--threads 2] [--json out.json] [--work DIR]

The fits read 48 × 512 other docstring tokens (each window's first token left out); λ per run
and the strength α of the refit (plain join, halfway, or the fit) are chosen on 4 × 512
validation docstring tokens, as the pipeline chooses them. "repaired" fits the fused run to the
attention-removed model's sequential run ("input"), "healed" to the original model's run output,
attention included ("original", the pipeline's default). The original's perplexity is compared
with PyTorch's on the same windows.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import onnx

from graphfuse import corpora, demo, genai, method, pipeline
from graphfuse.models import smollm2

BRIEF = {  # run: (attention removed only, + fused, + fused and repaired), PyTorch, brief §6
    "3-5": (16.18, 18.11, 16.48),
    "3-7": (17.96, 27.01, 18.74),
    "10-12": (17.76, 23.19, 21.63),
    "14-17": (20.51, 35.02, 22.21),
    "24-28": (24.39, 26347, 26.20),
}
COLUMNS = ("attention removed", "fused", "repaired", "healed")


def torch_perplexity(hf: Path, windows: np.ndarray) -> float:
    """PyTorch's perplexity of the Hugging Face model the build was made from."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            ids_t = torch.from_numpy(ids[None])
            logits = model(ids_t, use_cache=False).logits[0, :-1].double()
            nll += float(torch.nn.functional.cross_entropy(logits, ids_t[0, 1:], reduction="sum"))
            count += len(ids) - 1
    return math.exp(nll / count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(BRIEF))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--work", type=Path, help="folder for the model builds (default: temporary)"
    )
    parser.add_argument("--calibration-windows", type=int, default=48,
                        help="512-token windows the fits read (default 48)")  # fmt: skip
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="graphfuse-brief-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, built = demo.build_folders(work, smollm2.default_cache_dir(), "fp32")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(hf))
    docstrings = method.windows(None, tokenizer, calibration=args.calibration_windows)
    test = corpora.windows(tokenizer, corpora.text_sets(), seq_len=512, counts={"test": 4})
    windows = pipeline.Windows(
        calibration=docstrings.calibration, validation=docstrings.validation,
        in_domain=docstrings.evaluation, test=test["test"],
    )  # fmt: skip
    model = onnx.load(str(genai.model_file(built)))
    settings = pipeline.Settings(heal="none", max_run=None, threads=args.threads)
    pipe = pipeline.Pipeline(model, windows, settings, genai.dims(built, model))

    rows, original = [], None
    for spec in args.runs.split(","):
        a, b = map(int, spec.split("-"))
        layers = list(range(a + 1, b + 1))
        pipe.settings.heal = "none"
        plain = pipe.run(layers, analyse=False)
        original = plain.scores["original"]
        scores = {"attention removed": plain.scores["attention removed"],
                  "fused": plain.scores["final"]}  # fmt: skip
        fits = {}
        for column, target in (("repaired", "input"), ("healed", "original")):
            pipe.settings.heal, pipe.settings.heal_target = "ffn", target
            result = pipe.run(layers, analyse=False, only_final=True)
            scores[column] = result.scores["final"]
            (repair,) = result.repairs
            fits[column] = {"lambda": repair["lam"], "alpha": repair["alpha"]}
        row = {"run": spec, "brief": BRIEF.get(spec), "fits": fits,
               **{c: {t: s.perplexity for t, s in scores[c].items()} for c in COLUMNS}}  # fmt: skip
        rows.append(row)
        print(f"run {spec:>6}: " + "  ".join(
            f"{c} {row[c]['in_domain']:.2f} / {row[c]['test']:.2f}" for c in COLUMNS
        ) + f"  (docstrings / Vim manual; healed λ={fits['healed']['lambda']:g} "
            f"α={fits['healed']['alpha']:g})", flush=True)  # fmt: skip
    assert original is not None
    ppl_torch = torch_perplexity(hf, windows.in_domain)
    ppl_onnx = original["in_domain"].perplexity
    print(f"original: docstrings {ppl_onnx:.3f} (PyTorch {ppl_torch:.3f}, "
          f"{abs(ppl_onnx / ppl_torch - 1):.3%} apart), Vim manual {original['test'].perplexity:.3f}")  # fmt: skip
    print()
    print("| run | attention removed | fused | fused + repaired | fused + healed |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['run']} | " + " | ".join(
            f"{row[c]['in_domain']:,.2f} / {row[c]['test']:,.2f}" for c in COLUMNS) + " |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({
            "original": {"docstrings": ppl_onnx, "vim": original["test"].perplexity,
                         "torch_docstrings": ppl_torch},
            "rows": rows,
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
