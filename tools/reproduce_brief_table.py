"""Reproduce the table of BRIEF section 6 on ONNX: for each run a..b of SmolLM2-135M, remove the
attention of layers a+1..b, then fuse FFN blocks a..b, then repair the fused down-projection;
perplexity on 4 × 512 tokens of standard-library docstrings after each step.

    python tools/reproduce_brief_table.py [--runs 3-5,3-7,10-12,14-17,24-28] [--json out.json]

Calibration (for the repair) uses 48 × 512 other tokens (`--calibration-windows`), each
window's first token left out; λ is chosen on 4 × 512 validation tokens. "healed" fits the
fused run to the original model's run output instead (attention included). The original
model's ONNX perplexity is compared with PyTorch's on the same windows.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import onnx

from graphfuse import api, evaluate, method
from graphfuse.method import session
from graphfuse.models import smollm2
from graphfuse.passes.drop_attention import drop_attention

BRIEF = {  # run: (attention removed only, + fused, + fused and repaired), PyTorch, brief §6
    "3-5": (16.18, 18.11, 16.48),
    "3-7": (17.96, 27.01, 18.74),
    "10-12": (17.76, 23.19, 21.63),
    "14-17": (20.51, 35.02, 22.21),
    "24-28": (24.39, 26347, 26.20),
}


def exported(cache: Path, name: str, export) -> Path:
    """An export of SmolLM2, made once and kept in the cache."""
    path = cache / f"smollm2-{name}-v{smollm2.EXPORT_VERSION}.onnx"
    if not path.is_file():
        export(path, cache)
    return path


def torch_perplexity(windows, without_attention: list[int] = ()) -> float:  # type: ignore[assignment]
    """PyTorch's perplexity, with the attention of some layers replaced by zero (removed)."""
    import copy
    import math

    import torch

    model = copy.deepcopy(smollm2.load()[0])
    for layer in without_attention:
        attention = model.model.layers[layer].self_attn
        attention.forward = lambda hidden_states, *args, **kwargs: (
            torch.zeros_like(hidden_states),
            None,
        )
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
    parser.add_argument("--calibration-windows", type=int, default=48,
                        help="512-token windows the repair is fitted on (default 48)")  # fmt: skip
    args = parser.parse_args()

    cache = smollm2.default_cache_dir()
    smollm2.fetch(cache)
    original = onnx.load(exported(cache, "logits", smollm2.export_logits))
    windows = method.windows(
        None, smollm2.load_tokenizer(cache), calibration=args.calibration_windows
    )
    ppl_onnx = evaluate.perplexity(session(original, args.threads), windows.evaluation)
    ppl_torch = torch_perplexity(windows.evaluation)
    print(f"original: ONNX {ppl_onnx:.3f}, PyTorch {ppl_torch:.3f} "
          f"(differ by {abs(ppl_onnx / ppl_torch - 1):.3%})")  # fmt: skip
    rows = []
    for spec in args.runs.split(","):
        a, b = map(int, spec.split("-"))
        removed, _ = drop_attention(original, list(range(a + 1, b + 1)))
        fused, _ = api.fuse(removed, [(a, b)])
        repaired, (fit,) = method.fuse_and_repair(
            removed, [(a, b)], windows.calibration, windows.validation, args.threads
        )
        # Healing: the same fit against the original model's run output, attention included.
        healed, (heal,) = method.fuse_and_repair(
            removed, [(a, b)], windows.calibration, windows.validation, args.threads,
            reference=original,
        )  # fmt: skip
        ppl = [evaluate.perplexity(session(m, args.threads), windows.evaluation)
               for m in (removed, fused, repaired, healed)]  # fmt: skip
        torch_removed = torch_perplexity(windows.evaluation, list(range(a + 1, b + 1)))
        row = {"run": spec, "attention_removed": ppl[0], "torch_attention_removed": torch_removed,
               "fused": ppl[1], "repaired": ppl[2], "healed": ppl[3], "heal_lambda": heal.lam,
               "repaired_over_removed": ppl[2] / ppl[0], "lambda": fit.lam,
               "brief": BRIEF.get(spec), "repair": asdict(fit)}  # fmt: skip
        rows.append(row)
        print(f"run {spec:>6}: removed {ppl[0]:8.2f}  fused {ppl[1]:10.2f}  repaired {ppl[2]:8.2f}"
              f"  healed {ppl[3]:8.2f}"
              f"  (+{ppl[2] / ppl[0] - 1:.1%} over removed, λ={fit.lam:g}; PyTorch removed "
              f"{torch_removed:.2f}, {abs(ppl[0] / torch_removed - 1):.2%} apart)"
              f"   brief: {BRIEF.get(spec)}", flush=True)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"original_onnx": ppl_onnx, "original_torch": ppl_torch,
                                         "rows": rows}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
