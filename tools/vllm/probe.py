"""Probe a model folder with vLLM on the CPU and write what vLLM computes to a JSON file.

Run with the vLLM environment's python (made by tools/vllm/setup_env.sh), not the project's:

    .venv-vllm/bin/python tools/vllm/probe.py MODEL_DIR --out OUT.json [--tp 1|2]
        [--prompts PROMPTS.json] [--max-tokens 16] [--dtype float32] [--trust-remote-code]
        [--max-model-len 1024] [--compile] [--bench-decode N --bench-prompt-len P --bench-rounds R]

PROMPTS.json is a JSON list of lists of token ids; they go to vLLM as token ids
(`{"prompt_token_ids": ...}`), never through a tokenizer. OUT.json holds:

    model, vllm_version, tp, dtype, max_model_len, enforce_eager, engine_start_s,
    widths            per layer: the FFN intermediate width vLLM builds (None for ffn.no_op)
    attention_no_op   per layer: True where the layer has no attention
    prompts: [{
        prompt_token_ids,
        prompt_logprobs   [n-1] raw log-prob of the actual token at positions 1..n-1
        prompt_top2       [n-1] [[token_id, logprob], [token_id, logprob]] at positions 1..n-1
        output_token_ids  greedy continuation (temperature 0, exactly --max-tokens, ignore_eos)
        output_logprobs   log-prob of each generated token
        output_top2       per generated step, as prompt_top2
    }]
    bench (with --bench-decode): {new_tokens, prompt_len, rounds: [{decode_tok_s, e2e_s, ...}],
        decode_method}

Log-probs are raw model log-probs (log_softmax of the logits; `logprobs_mode="raw_logprobs"`).
Defaults set before vLLM is imported: VLLM_CPU_KVCACHE_SPACE=1 (GB) and, for --tp 2,
VLLM_CPU_OMP_THREADS_BIND="0|1" (one core per rank); values already in the environment win.
Exits 1 with a one-line message on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tp", type=int, default=1, choices=(1, 2))
    p.add_argument("--prompts", type=Path, help="JSON list of lists of token ids")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument(
        "--compile",
        action="store_true",
        help="let vLLM torch.compile the model (default: enforce_eager; compiling adds "
        "~60-90 s to every start here, since 0.32.0's compile cache fails to reload)",
    )
    p.add_argument("--bench-decode", type=int, default=0, metavar="N", help="new tokens to time")
    p.add_argument("--bench-prompt-len", type=int, default=64, metavar="P")
    p.add_argument("--bench-rounds", type=int, default=3, metavar="R")
    return p.parse_args(argv)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Attribute or dict access (block_configs entries come as either)."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _has(obj: Any, key: str) -> bool:
    return key in obj if isinstance(obj, dict) else hasattr(obj, key)


def layer_widths(hf_config: Any) -> tuple[list[int | None], list[bool]]:
    """FFN width and attention no-op flag per layer, as vLLM's model classes compute them."""
    blocks = getattr(hf_config, "block_configs", None)
    if not blocks:  # plain Llama-like config
        n = hf_config.num_hidden_layers
        return [hf_config.intermediate_size] * n, [False] * n
    from vllm.model_executor.models.nemotron_nas import _ffn_mult_to_intermediate_size

    widths: list[int | None] = []
    no_attn: list[bool] = []
    for block in blocks:  # mirrors DeciLMDecoderLayer.__init__
        ffn, attn = _get(block, "ffn"), _get(block, "attention")
        no_attn.append(bool(_get(attn, "no_op", False)))
        if _get(ffn, "no_op", False):
            widths.append(None)
        elif _has(ffn, "ffn_mult") and _get(ffn, "ffn_mult") is not None:
            widths.append(
                _ffn_mult_to_intermediate_size(_get(ffn, "ffn_mult"), hf_config.hidden_size)
            )
        else:
            widths.append(int(_get(ffn, "intermediate_size")))
    return widths, no_attn


def top2(position: Any) -> list[list[int | float]]:
    """The two highest-ranked [token_id, logprob] pairs of one position's logprob dict."""
    ranked = sorted(position.items(), key=lambda kv: kv[1].rank or sys.maxsize)
    return [
        [int(t), float(lp.logprob)] for t, lp in ranked if lp.rank is not None and lp.rank <= 2
    ][:2]


def probe_prompts(llm: Any, prompts: list[list[int]], max_tokens: int, detok: bool) -> list[dict]:
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        ignore_eos=True,
        logprobs=2,
        prompt_logprobs=2,
        detokenize=detok,
    )
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    results = []
    for ids, out in zip(prompts, outs, strict=True):
        plp = list(out.prompt_logprobs)[1:]  # position 0 has no prediction
        comp = out.outputs[0]
        gen = list(comp.token_ids)
        results.append(
            {
                "prompt_token_ids": ids,
                "prompt_logprobs": [
                    float(pos[t].logprob) for pos, t in zip(plp, ids[1:], strict=True)
                ],
                "prompt_top2": [top2(pos) for pos in plp],
                "output_token_ids": gen,
                "output_logprobs": [
                    float(pos[t].logprob) for pos, t in zip(comp.logprobs, gen, strict=True)
                ],
                "output_top2": [top2(pos) for pos in comp.logprobs],
                **({"output_text": comp.text} if detok else {}),
            }
        )
    return results


def bench_decode(llm: Any, vocab: int, n_new: int, prompt_len: int, rounds: int) -> dict:
    """Batch-1 greedy decode of n_new tokens after a random prompt, timed per round.

    Decode time comes from vLLM's request metrics (engine-core timestamps of the first and
    last generated token: n_new - 1 decode steps); without metrics it falls back to
    wall(prompt + n_new tokens) - wall(prompt + 1 token).
    """
    import random

    from vllm import SamplingParams

    rng = random.Random(0)
    prompt = {"prompt_token_ids": [rng.randrange(vocab) for _ in range(prompt_len)]}

    def run(n: int) -> tuple[float, Any]:
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        return time.perf_counter() - t0, out

    run(4)  # warm-up, not reported
    rows = []
    for _ in range(rounds):
        e2e, out = run(n_new)
        m = out.metrics
        if m is not None and m.last_token_ts > m.first_token_ts:
            decode_s, method = m.last_token_ts - m.first_token_ts, "request_metrics"
        else:
            decode_s, method = e2e - run(1)[0], "wall_difference"
        rows.append(
            {
                "decode_tok_s": (n_new - 1) / decode_s,
                "decode_s": decode_s,
                "e2e_s": e2e,
                "e2e_tok_s": n_new / e2e,
                "generated": len(out.outputs[0].token_ids),
            }
        )
    return {"new_tokens": n_new, "prompt_len": prompt_len, "rounds": rows, "decode_method": method}


def main(args: argparse.Namespace) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.tp == 2:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    if not (args.model_dir / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {args.model_dir}")
    prompts: list[list[int]] = json.loads(args.prompts.read_text()) if args.prompts else []
    if not all(isinstance(p, list) and len(p) >= 2 for p in prompts):
        raise ValueError("--prompts must be a JSON list of lists of >= 2 token ids")
    has_tok = any((args.model_dir / f).exists() for f in TOKENIZER_FILES)
    config = json.loads((args.model_dir / "config.json").read_text())
    max_len = min(args.max_model_len, config.get("max_position_embeddings") or args.max_model_len)
    import vllm
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(
        model=str(args.model_dir),
        tensor_parallel_size=args.tp,
        dtype=args.dtype,
        max_model_len=max_len,
        trust_remote_code=args.trust_remote_code,
        skip_tokenizer_init=not has_tok,
        enable_prefix_caching=False,  # every prompt (and bench round) is computed in full
        logprobs_mode="raw_logprobs",
        enforce_eager=not args.compile,
        disable_log_stats=not args.bench_decode,  # request metrics only exist with stats on
        seed=0,
    )
    start_s = time.perf_counter() - t0
    hf_config = llm.llm_engine.model_config.hf_config
    widths, no_attn = layer_widths(hf_config)

    result: dict = {
        "model": str(args.model_dir),
        "vllm_version": vllm.__version__,
        "tp": args.tp,
        "dtype": args.dtype,
        "max_model_len": max_len,
        "enforce_eager": not args.compile,
        "engine_start_s": start_s,
        "widths": widths,
        "attention_no_op": no_attn,
        "prompts": probe_prompts(llm, prompts, args.max_tokens, has_tok) if prompts else [],
    }
    if args.bench_decode:
        result["bench"] = bench_decode(
            llm, hf_config.vocab_size, args.bench_decode, args.bench_prompt_len, args.bench_rounds
        )
    return result


if __name__ == "__main__":
    cli = parse_args()
    try:
        out = main(cli)
        cli.out.parent.mkdir(parents=True, exist_ok=True)
        cli.out.write_text(json.dumps(out, indent=1))
    except Exception as exc:  # one line for the caller; vLLM's own log went to stderr already
        print(f"probe.py: {type(exc).__name__}: {exc}".splitlines()[0], file=sys.stderr)
        sys.exit(1)
