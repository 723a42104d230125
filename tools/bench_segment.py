"""FFN segment latency on ONNX Runtime CPU: k sequential SwiGLU blocks vs the fused wide FFN.

    python tools/bench_segment.py                       # H=576, I=1536, k=4, 1 thread, 1 token
    python tools/bench_segment.py --blocks 2 4 8 --threads 2 --pairs 800
    python tools/bench_segment.py --nbits 4 --blocks 3 5   # MatMulNBits: exact vs requantised

The models are `graphfuse.models.synthetic` stacks (SmolLM2's FFN sizes by default) fused by
`graphfuse.fuse`, with gate and up as two MatMuls and packed into one MatMul + Split. With
``--nbits`` every projection is first quantised to MatMulNBits by onnxruntime's own quantiser
(block 32, symmetric), and the fused forms are the exact one (per-branch norm and gate/up, the
down projections joined in the packed domain) and the requantised one (γ folded, gate/up
concatenated and requantised: one shared norm, three MatMulNBits). Timing is
`graphfuse.latency.compare_latency` (warm-up, interleaved A/B pairs, ratio of medians and median
of pairwise ratios) with this machine's streaming bandwidth as the roofline: a decode step at
batch 1 must read every weight once, so weight bytes ÷ bandwidth is its floor.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import onnx

import graphfuse
from graphfuse.latency import compare_latency, format_table, measure_bandwidth
from graphfuse.models.synthetic import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--inter", type=int, default=1536)
    parser.add_argument("--blocks", type=int, nargs="+", default=[4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=1500)
    parser.add_argument("--scenario", default="decode-128", help="decode-* is one token")
    parser.add_argument("--nbits", type=int, choices=[4, 8], help="quantise to MatMulNBits first")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    arms = {"fused": {"pack": False}, "fused-packed": {"pack": True}}
    if args.nbits:
        arms = {"fused-exact": {}, "fused-requantized": {"requantize": True}}

    bandwidth = measure_bandwidth(threads=args.threads)
    print(f"streaming bandwidth: {bandwidth.read_gbps:.1f} GB/s ({args.threads} thread(s))")
    results = {}
    with tempfile.TemporaryDirectory(prefix="graphfuse-segment-") as tmp:
        for k in args.blocks:
            model = build(args.hidden, [args.inter] * k, seed=0).model
            if args.nbits:
                model = quantized(model, args.nbits)
            paths = {"sequential": Path(tmp) / f"seq{k}.onnx"}
            onnx.save(model, paths["sequential"])
            for name, options in arms.items():
                fused, _ = graphfuse.fuse(model, "all", **options)
                paths[name] = Path(tmp) / f"{name}{k}.onnx"
                onnx.save(fused, paths[name])
            for name in arms:
                report = compare_latency(
                    paths["sequential"], paths[name], scenarios=[args.scenario],
                    threads=args.threads, pairs=args.pairs, labels=("sequential", name),
                    bandwidth=bandwidth,
                )  # fmt: skip
                print(f"\nk={k}: sequential vs {name}")
                print(format_table(report))
                results[f"k{k}-{name}"] = report.as_dict()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


def quantized(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """Every MatMul with a constant weight as a MatMulNBits, by onnxruntime's quantiser."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    config = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, bits=bits)
    quantizer = MatMulNBitsQuantizer(model, algo_config=config)
    quantizer.process()
    return quantizer.model.model


if __name__ == "__main__":
    main()
