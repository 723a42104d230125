"""Batch-1 decode latency on one accelerator: sequential FFN blocks vs FFN Fusion, in PyTorch.

    python tools/gpu_check.py --json gpu.json           # on the GPU: ~15 s timing + start-up
    python tools/gpu_check.py                           # here: CPU, small sizes, a few seconds

Two measurements, each interleaved A/B(/C) in alternating rounds (median, p90, ratio of medians):

- segment: 4 SwiGLU blocks at Llama-70B width (H=8192, I=28672), x += FFN_i(n_i(x)) in turn,
  against the fused wide FFN x + Σ FFN_i(n_i(x)): one unit-gain RMSNorm (the gains γ_i folded into
  the gate/up rows), one packed gate|up GEMM [H, 2·4I], one down GEMM [4I, H], one residual add.
  Before timing, the fused output is checked against the parallel reference Σ FFN_i(n_i(x)),
  computed branch by branch in fp32 (tolerance 1e-4 relative in fp32, 3e-2 in bf16).
- stack: a SmolLM2-shaped decoder (30 layers, H=576, I=1536, GQA 9/3 heads, KV cache of --past
  tokens), one token: the original, the same with the plan's attention removed, and the plan
  fused. The plan comes from --layout (layers numbered from 0; keys may sit under "plan") or is
  the demo's: 13 attentions removed, 8 fused runs, 30 -> 20 FFN stages.

Why: at batch 1 every GEMM is a matrix-vector product. On a GPU a small one cannot fill the chip
and each kernel has a fixed cost, so fusion pays by issuing fewer, larger kernels. CUDA graphs
(one captured decode step, replayed, timed with CUDA events) remove the CPU launch overhead that
eager PyTorch would add, so what remains is the GPU-side gain. The Llama-70B segment streams
~5.6 GB of bf16 weights per step, so it is likely bandwidth-bound (ratio near 1; its GB/s line
says how close); the SmolLM2 stack's small GEMMs are where fewer kernels should show. Both sides
pack gate|up per block, so a ratio measures fusion, not packing.

Runs with torch, numpy and the standard library only (the GPU machine has no package index).
On the CPU it uses fp32, no graphs, and --small sizes unless --full is given. --time-budget
(default 200 s) bounds the whole run (timing rounds stop at their share; a run cut short says
so); with the defaults an H200 should need well under a minute in all, start-up included. Exit codes: 0 ok, 1 the
fused-vs-parallel check failed (figures are still written), 2 bad arguments or layout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-5
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
DEMO_PLAN: dict[str, Any] = {
    "num_layers": 30, "hidden": 576, "intermediate": 1536, "heads": 9, "kv_heads": 3,
    "attention_removed": [3, 6, 7, 9, 14, 17, 22, 25, 26, 28],
    "fused_runs": [[2, 3], [5, 7], [8, 9], [13, 14], [16, 17], [21, 22], [24, 26], [27, 28]],
}  # fmt: skip


class UsageError(Exception):
    """A bad flag, layout or device; reported on one line with exit code 2."""


# ---------------------------------------------------------------- layout
@dataclass(frozen=True)
class Layout:
    num_layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    attention_removed: frozenset[int]
    fused_runs: tuple[tuple[int, int], ...]

    @property
    def ffn_stages(self) -> int:
        return self.num_layers - sum(b - a for a, b in self.fused_runs)


def _from_plan(plan: dict) -> dict:
    """The layout keys of a graphfuse plan (graphfuse.plan: `graphfuse demo` writes plan.json);
    head counts are not in a plan and keep SmolLM2's."""
    try:
        source = plan["source"]
        widths = set(source["intermediate"])
        return {
            "num_layers": source["layers"], "hidden": source["hidden"],
            "intermediate": widths.pop() if len(widths) == 1 else None,
            "attention_removed": plan["attention_removed"],
            "fused_runs": [r["layers"] for r in plan["runs"]],
        }  # fmt: skip
    except (KeyError, TypeError) as e:
        raise UsageError(f"layout: the plan lacks or mangles {e}") from None


def parse_layout(raw: Any) -> Layout:
    """Reads and validates a plan; the same keys may sit under "plan", extra keys are ignored."""
    if isinstance(raw, dict) and isinstance(raw.get("plan"), dict):
        raw = raw["plan"]
    if isinstance(raw, dict) and raw.get("schema") == "graphfuse.plan":  # a plan.json
        raw = _from_plan(raw)
    if not isinstance(raw, dict) or "fused_runs" not in raw:
        raise UsageError('layout: expected an object with "fused_runs" (or one under "plan")')

    def integer(value: Any, what: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"layout: {what} must be an integer, got {value!r}")
        return value

    dims = {k: integer(raw.get(k, DEMO_PLAN[k]), k) for k in ("num_layers", "hidden",
            "intermediate", "heads", "kv_heads")}  # fmt: skip
    if min(dims.values()) < 1:
        raise UsageError(f"layout: sizes must be positive: {dims}")
    n = dims["num_layers"]
    if dims["hidden"] % dims["heads"] or dims["heads"] % dims["kv_heads"]:
        raise UsageError(f"layout: heads must divide hidden and kv_heads divide heads: {dims}")
    removed = [integer(v, "attention_removed entry") for v in raw.get("attention_removed", [])]
    for layer in removed:
        if not 0 <= layer < n:
            raise UsageError(f"layout: attention_removed layer {layer} is outside 0..{n - 1}")
    runs: list[tuple[int, int]] = []
    for run in raw["fused_runs"]:
        if not (isinstance(run, list | tuple) and len(run) == 2):
            raise UsageError(f"layout: fused run {run!r} is not [first, last]")
        a, b = integer(run[0], "fused run bound"), integer(run[1], "fused run bound")
        if not 0 <= a < b < n:
            raise UsageError(
                f"layout: fused run {a}-{b} is not inside 0..{n - 1} with first < last"
            )
        if missing := [layer for layer in range(a + 1, b + 1) if layer not in removed]:
            raise UsageError(
                f"layout: fused run {a}-{b}: attention of layer(s) {missing} not removed"
            )
        runs.append((a, b))
    runs.sort()
    for (a0, b0), (a1, b1) in pairwise(runs):
        if a1 <= b0:
            raise UsageError(f"layout: fused runs {a0}-{b0} and {a1}-{b1} overlap")
    return Layout(**dims, attention_removed=frozenset(removed), fused_runs=tuple(runs))


def read_layout(path: Path | None) -> Layout:
    if path is None:
        return parse_layout(DEMO_PLAN)
    try:
        return parse_layout(json.loads(path.read_text()))
    except (OSError, ValueError) as err:
        raise UsageError(f"layout: cannot read {path}: {err}".splitlines()[0]) from None


# ---------------------------------------------------------------- model pieces
@dataclass
class Ffn:
    """One SwiGLU branch with gate|up packed: W2ᵀ(silu(W1ᵀz) ⊙ W3ᵀz), z = RMSNorm(x) · gain."""

    gain: Tensor | None  # [H]; None = unit gain (fused)
    w13: Tensor  # [H, 2I]: gate columns, then up columns
    w2: Tensor  # [I, H]

    def __call__(self, x: Tensor) -> Tensor:
        z = F.rms_norm(x, (x.shape[-1],), self.gain, EPS)
        gate, up = (z @ self.w13).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2

    def to(self, dtype: torch.dtype) -> Ffn:
        gain = None if self.gain is None else self.gain.to(dtype)
        return Ffn(gain, self.w13.to(dtype), self.w2.to(dtype))


def fuse(blocks: Sequence[Ffn]) -> Ffn:
    """Σ_i FFN_i(n_i(x)) as one wide FFN: γ_i folded into gate/up rows, columns concatenated."""
    gains = [b.gain if b.gain is not None else torch.ones_like(b.w13[:, 0]) for b in blocks]
    folded = [g[:, None] * b.w13 for g, b in zip(gains, blocks, strict=True)]
    gates, ups = zip(*(w.chunk(2, dim=1) for w in folded), strict=True)
    return Ffn(None, torch.cat([*gates, *ups], dim=1), torch.cat([b.w2 for b in blocks]))


@dataclass
class Attention:
    """Pre-norm GQA self-attention of one new token over a KV cache of `past` tokens."""

    gain: Tensor
    wqkv: Tensor  # [H, (heads + 2 kv_heads) · head_dim]
    wo: Tensor  # [heads · head_dim, H]
    k_cache: Tensor  # [1, kv_heads, past + 1, head_dim]; the last slot takes the new token
    v_cache: Tensor
    rope: tuple[Tensor, Tensor]  # cos, sin at the new token's position, [head_dim]

    def __call__(self, x: Tensor) -> Tensor:
        kv_heads, head_dim = self.k_cache.shape[1], self.k_cache.shape[3]
        group = self.wo.shape[0] // (kv_heads * head_dim)
        qkv = F.rms_norm(x, (x.shape[-1],), self.gain, EPS) @ self.wqkv
        q, k, v = qkv.split(
            [group * kv_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], -1
        )
        # One query token: a KV group's query heads become its query rows, so GQA needs no repeat.
        q = self._rotate(q.view(1, kv_heads, group, head_dim))
        self.k_cache[:, :, -1:].copy_(self._rotate(k.view(1, kv_heads, 1, head_dim)))
        self.v_cache[:, :, -1:].copy_(v.view(1, kv_heads, 1, head_dim))
        out = F.scaled_dot_product_attention(q, self.k_cache, self.v_cache)
        return out.reshape(1, -1) @ self.wo

    def _rotate(self, t: Tensor) -> Tensor:
        cos, sin = self.rope
        t1, t2 = t.chunk(2, dim=-1)
        return t * cos + torch.cat([-t2, t1], dim=-1) * sin


Stage = Callable[[Tensor], Tensor]  # a residual branch: x -> x + stage(x)


def run_stages(x: Tensor, stages: Sequence[Stage]) -> Tensor:
    for stage in stages:
        x = x + stage(x)
    return x


class Factory:
    """Seeded random weights, scaled by 1/sqrt(fan_in) so activations stay O(1) in bf16."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device, self.dtype = device, dtype
        self.gen = torch.Generator(device=device).manual_seed(0)

    def randn(self, *shape: int, scale: float = 1.0) -> Tensor:
        t = torch.randn(*shape, generator=self.gen, device=self.device, dtype=torch.float32)
        return (t * scale).to(self.dtype)

    def ffn(self, hidden: int, inter: int) -> Ffn:
        gain = (1 + 0.1 * self.randn(hidden).float()).to(self.dtype)
        w13 = self.randn(hidden, 2 * inter, scale=hidden**-0.5)
        return Ffn(gain, w13, self.randn(inter, hidden, scale=inter**-0.5))

    def attention(self, layout: Layout, past: int) -> Attention:
        h, d = layout.hidden, layout.hidden // layout.heads
        position = torch.tensor(float(past), device=self.device)
        angles = position * 10000.0 ** (-torch.arange(0, d, 2, device=self.device) / d)
        rope = (angles.cos().repeat(2).to(self.dtype), angles.sin().repeat(2).to(self.dtype))
        qkv = self.randn(h, (layout.heads + 2 * layout.kv_heads) * d, scale=h**-0.5)
        cache = (1, layout.kv_heads, past + 1, d)
        wo = self.randn(layout.heads * d, h, scale=(layout.heads * d) ** -0.5)
        return Attention(self.randn(h) + 1, qkv, wo, self.randn(*cache), self.randn(*cache), rope)


def stack_variants(layout: Layout, factory: Factory, past: int) -> dict[str, list[Stage]]:
    """The original decoder, the same with the plan's attention removed, and the plan fused."""
    attn = [factory.attention(layout, past) for _ in range(layout.num_layers)]
    ffns = [factory.ffn(layout.hidden, layout.intermediate) for _ in range(layout.num_layers)]
    run_of = {a: fuse(ffns[a : b + 1]) for a, b in layout.fused_runs}
    inside = {layer for a, b in layout.fused_runs for layer in range(a + 1, b + 1)}
    original: list[Stage] = [s for pair in zip(attn, ffns, strict=True) for s in pair]
    removed: list[Stage] = []
    fused: list[Stage] = []
    for layer in range(layout.num_layers):
        if layer not in layout.attention_removed:
            removed.append(attn[layer])
            fused.append(attn[layer])
        removed.append(ffns[layer])
        if layer not in inside:
            fused.append(run_of.get(layer, ffns[layer]))
    return {"original": original, "attention removed": removed, "fused": fused}


# ---------------------------------------------------------------- timing
Runner = Callable[[int], float]  # iters -> seconds per step


def make_runner(forward: Callable[[Tensor], Tensor], x: Tensor) -> Runner:
    """One decode step on a static input; on CUDA captured once as a graph and replayed."""
    out = torch.empty_like(x)

    def step() -> None:
        out.copy_(forward(x))

    if x.device.type != "cuda":

        def run_eager(iters: int) -> float:
            start = time.perf_counter()
            for _ in range(iters):
                step()
            return (time.perf_counter() - start) / iters

        return run_eager

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as capture requires
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run_graph(iters: int) -> float:
        begin.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3 / iters

    return run_graph


def interleave(
    runners: dict[str, Runner], rounds: int, iters: int, deadline: float
) -> dict[str, Any]:
    """Alternating rounds (A B C, B C A, ...) so drift hits every variant alike."""
    names = list(runners)
    for run in runners.values():
        run(iters)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        if r and time.monotonic() > deadline:
            break
        for name in names[r % len(names) :] + names[: r % len(names)]:
            samples[name].append(runners[name](iters) * 1e6)
    done = len(samples[names[0]])
    timings = {name: {"median_us": statistics.median(s), "p90_us": float(np.percentile(s, 90)),
                      "samples": len(s)} for name, s in samples.items()}  # fmt: skip
    speedups = {f"{a}/{b}": timings[a]["median_us"] / timings[b]["median_us"]
                for i, a in enumerate(names) for b in names[i + 1 :]}  # fmt: skip
    return {"rounds": done, "iters": iters, "stopped_early": done < rounds,
            "timings": timings, "speedup": speedups}  # fmt: skip


# ---------------------------------------------------------------- the two measurements
def check_memory(what: str, need_bytes: int, device: torch.device) -> None:
    if device.type == "cuda":
        free, where = torch.cuda.mem_get_info(device)[0], "free on the GPU"
    else:
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        where = "allowed (half this machine's memory); use --small"
    if need_bytes > free:
        raise UsageError(
            f"{what} needs ~{need_bytes / 1e9:.1f} GB, more than the {free / 1e9:.1f} GB {where}"
        )


def measure_segment(args: argparse.Namespace, factory: Factory, deadline: float) -> dict[str, Any]:
    hidden, inter, k = (256, 512, args.blocks) if args.small else (8192, 28672, args.blocks)
    need = 2 * 3 * k * hidden * inter * factory.dtype.itemsize + 3 * hidden * inter * 4
    check_memory(f"segment H={hidden} I={inter}", need, factory.device)  # blocks, fused, fp32 ref
    blocks = [factory.ffn(hidden, inter) for _ in range(k)]
    wide = fuse(blocks)
    x = factory.randn(1, hidden)
    reference = sum(
        (b.to(torch.float32)(x.float()) for b in blocks), torch.zeros(1, hidden, device=x.device)
    )
    difference = wide(x).float() - reference
    error = difference.norm().item() / reference.norm().item()
    tol = TOLERANCE[factory.dtype]
    result: dict[str, Any] = {
        "config": {"blocks": k, "hidden": hidden, "intermediate": inter,
                   "weight_bytes": sum(b.w13.nbytes + b.w2.nbytes for b in blocks)},
        "check": {"relative_error": error, "max_abs_error": difference.abs().max().item(),
                  "tolerance": tol, "passed": error <= tol},
    }  # fmt: skip
    runners = {"sequential": make_runner(partial(run_stages, stages=blocks), x),
               "fused": make_runner(partial(run_stages, stages=[wide]), x)}  # fmt: skip
    return result | interleave(runners, args.rounds, args.iters, deadline)


def measure_stack(args: argparse.Namespace, factory: Factory, deadline: float) -> dict[str, Any]:
    layout = read_layout(args.layout)
    if args.small:
        layout = replace(layout, hidden=64, intermediate=128, heads=4, kv_heads=2)
    variants = stack_variants(layout, factory, args.past)
    x = factory.randn(1, layout.hidden)
    runners = {name: make_runner(partial(run_stages, stages=s), x) for name, s in variants.items()}
    config = vars(layout) | {"attention_removed": sorted(layout.attention_removed), "past": args.past,
                             "ffn_stages": layout.ffn_stages}  # fmt: skip
    return {"config": config} | interleave(runners, args.rounds, args.iters, deadline)


def format_table(name: str, result: dict[str, Any]) -> str:
    c = result["config"]
    if name == "segment":
        head = f"{c['blocks']} SwiGLU blocks, H={c['hidden']}, I={c['intermediate']}"
    else:
        runs = " ".join(f"{a}-{b}" for a, b in c["fused_runs"])
        head = (f"{c['num_layers']} layers, H={c['hidden']}, I={c['intermediate']}, heads "
                f"{c['heads']}/{c['kv_heads']}, KV cache {c['past']}; attention removed in "
                f"{len(c['attention_removed'])} layers, fused runs {runs or '-'}: "
                f"{c['num_layers']} -> {c['ffn_stages']} FFN stages")  # fmt: skip
    lines = [f"\n{name}: {head}, batch 1 x 1 token"]
    if "check" in result:
        chk = result["check"]
        verdict = "ok" if chk["passed"] else "FAILED"
        lines.append(f"  check: fused vs parallel reference Σ FFN_i(n_i(x)), relative error "
                     f"{chk['relative_error']:.2e} (tolerance {chk['tolerance']:.0e}): {verdict}")  # fmt: skip
    lines.append(f"  {'variant':<20}{'median µs':>12}{'p90 µs':>12}{'speed-up':>10}")
    timings = result["timings"]
    base = next(iter(timings))
    for variant, t in timings.items():
        ratio = timings[base]["median_us"] / t["median_us"]
        lines.append(f"  {variant:<20}{t['median_us']:>12.1f}{t['p90_us']:>12.1f}{ratio:>9.3f}×")
    for pair, ratio in result["speedup"].items():
        if not pair.startswith(f"{base}/"):  # e.g. fusion alone, on top of attention removal
            lines.append(f"  {pair}: {ratio:.3f}×")
    if "weight_bytes" in c:
        gbps = c["weight_bytes"] / result["timings"]["sequential"]["median_us"] / 1e3
        lines.append(
            f"  sequential streams {c['weight_bytes'] / 1e9:.2f} GB of weights: {gbps:.0f} GB/s"
        )
    more = " (stopped early: time budget)" if result["stopped_early"] else ""
    lines.append(f"  {result['rounds']} rounds × {result['iters']} steps, interleaved{more}")
    return "\n".join(lines)


def write_json(path: Path, figures: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(figures, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def cpu_name() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return next(line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name"))  # fmt: skip
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "cpu"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--small", action="store_true", help="tiny sizes (the CPU's default)")
    size.add_argument("--full", dest="small", action="store_false", help="real sizes on a CPU")
    parser.set_defaults(small=None)  # None: small on the CPU, full on CUDA
    parser.add_argument("--only", choices=["segment", "stack"])
    parser.add_argument("--layout", type=Path, help="plan JSON for the stack (default: demo plan)")
    parser.add_argument("--blocks", type=int, default=4, help="FFN blocks in the segment")
    parser.add_argument("--past", type=int, default=128, help="KV-cache length of the stack")
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--iters", type=int, help="steps per round (default 50 CUDA, 5 CPU)")
    parser.add_argument("--time-budget", type=float, default=200.0, metavar="SECONDS")
    parser.add_argument("--json", type=Path, help="write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UsageError("--device cuda: no CUDA device visible to torch")
        if min(args.blocks, args.past, args.rounds, args.iters or 1) < 1:
            raise UsageError("--blocks, --past, --rounds and --iters must be positive")
        cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
        device = torch.device("cuda" if cuda else "cpu")
        args.small = (not cuda) if args.small is None else args.small
        args.iters = args.iters or (50 if cuda else 5)
        if args.only != "segment":
            read_layout(args.layout)  # a bad layout fails before anything is timed
        factory = Factory(device, torch.bfloat16 if cuda else torch.float32)
        name = torch.cuda.get_device_name(device) if cuda else cpu_name()
        figures: dict[str, Any] = {"device": name, "dtype": str(factory.dtype).removeprefix("torch."),
                                   "torch": torch.__version__, "cuda_graphs": cuda,
                                   "threads": torch.get_num_threads(), "small": args.small}  # fmt: skip
        print(f"gpu_check: {name} ({device.type}), {figures['dtype']}, torch {torch.__version__}, "
              f"CUDA graphs {'on' if cuda else 'off'}, {figures['threads']} CPU threads")  # fmt: skip
        start = time.monotonic()
        phases = [p for p in ("segment", "stack") if args.only in (None, p)]
        with torch.inference_mode():
            for i, phase in enumerate(phases):
                left = args.time_budget - (time.monotonic() - start)
                deadline = time.monotonic() + left / (len(phases) - i)
                measure = measure_segment if phase == "segment" else measure_stack
                try:
                    figures[phase] = measure(args, factory, deadline)
                    print(format_table(phase, figures[phase]), flush=True)
                except RuntimeError as err:  # e.g. a failed capture: keep the other phase's figures
                    figures[phase] = {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
                    print(f"\n{phase}: FAILED: {figures[phase]['error']}", flush=True)
                if cuda:
                    torch.cuda.empty_cache()
                if args.json:  # after every phase, so a crash later loses nothing measured
                    write_json(args.json, figures | {"elapsed_s": time.monotonic() - start})
    except UsageError as err:
        print(f"gpu_check: error: {err}", file=sys.stderr)
        return 2
    results = [figures[p] for p in phases]
    early = (
        " (timing stopped early: time budget)"
        if any(r.get("stopped_early") for r in results)
        else ""
    )
    print(f"\ntotal {time.monotonic() - start:.1f} s, budget {args.time_budget:.0f} s{early}")
    if args.json:
        print(f"figures written to {args.json}")
    ok = all("error" not in r and r.get("check", {}).get("passed", True) for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
