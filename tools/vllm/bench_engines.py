"""Time batch-1 greedy decode of several models in vLLM, interleaved (run with .venv-vllm's python).

    .venv-vllm/bin/python tools/vllm/bench_engines.py DIR... --out OUT.json [--tp 1|2]
        [--new 128] [--prompt 128] [--rounds 5]

Every model gets its own engine in this one process, all started before any timing; then each
round times every model once, in an order that rotates from round to round, so that drift of
the machine falls on all of them alike. Decode tokens/s come from vLLM's request metrics (first
to last generated token), as in probe.py. OUT.json: {tp, new, prompt, models: {DIR: [tok/s per
round]}, engine_start_s: {DIR: s}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tp", type=int, default=1, choices=(1, 2))
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tp == 2:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    import random

    from vllm import LLM, SamplingParams

    engines, starts = {}, {}
    for model in args.models:
        t0 = time.perf_counter()
        engines[str(model)] = LLM(model=str(model), tensor_parallel_size=args.tp, dtype="float32",
                                  max_model_len=args.prompt + args.new + 8, trust_remote_code=True,
                                  skip_tokenizer_init=True, enable_prefix_caching=False,
                                  enforce_eager=True, disable_log_stats=False, seed=0)  # fmt: skip
        starts[str(model)] = time.perf_counter() - t0
    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(1000, 30000) for _ in range(args.prompt)]}
    params = SamplingParams(temperature=0.0, max_tokens=args.new, ignore_eos=True, detokenize=False)
    for llm in engines.values():  # warm-up
        llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False),
                     use_tqdm=False)  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in engines}
    names = list(engines)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            out = engines[name].generate([prompt], params, use_tqdm=False)[0]
            m = out.metrics
            times[name].append((args.new - 1) / (m.last_token_ts - m.first_token_ts))
    args.out.write_text(json.dumps({"tp": args.tp, "new": args.new, "prompt": args.prompt,
                                    "models": times, "engine_start_s": starts}, indent=1))  # fmt: skip


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # one line for the caller; vLLM's own log went to stderr already
        print(f"bench_engines.py: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
