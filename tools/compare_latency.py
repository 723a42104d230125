"""Compare the latency of two ONNX models: a thin CLI over graphfuse.latency.

    python tools/compare_latency.py original.onnx fused.onnx --scenario decode-128 \\
        --scenario prefill-128 --threads 1 --pairs 500 --json out.json --png out.png

Errors print one line and exit 2 (the traceback only with --debug).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphfuse.errors import GraphfuseError


def _parser() -> argparse.ArgumentParser:
    from graphfuse.latency import BACKENDS, SCENARIOS

    p = argparse.ArgumentParser(prog="compare_latency", description=__doc__.splitlines()[0])
    p.add_argument("model_a", type=Path, help="model A, e.g. the original")
    p.add_argument("model_b", type=Path, help="model B, e.g. the fused one")
    p.add_argument(
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="repeatable; default decode-128",
    )
    p.add_argument("--backend", choices=list(BACKENDS), default="ort-cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--pairs", type=int, default=200, help="interleaved A/B pairs (default 200)")
    p.add_argument("--warmup", type=int, default=20, help="warm-up pairs (default 20)")
    p.add_argument("--labels", default="A,B", help="names of the two models, e.g. original,fused")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the memory-bandwidth probe")
    p.add_argument("--engine-dir", type=Path, help="backend trt: keep the built engines here")
    p.add_argument("--json", type=Path, help="write the report as JSON")
    p.add_argument("--png", type=Path, help="write a bar chart (needs matplotlib)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        from graphfuse.latency import compare_latency, format_table, plot_report

        labels = tuple(args.labels.split(","))
        if len(labels) != 2 or not all(labels):
            raise GraphfuseError(
                f"--labels needs two names separated by a comma, got {args.labels!r}"
            )
        report = compare_latency(
            args.model_a,
            args.model_b,
            scenarios=args.scenario or ["decode-128"],
            backend=args.backend,
            threads=args.threads,
            pairs=args.pairs,
            warmup=args.warmup,
            labels=(labels[0], labels[1]),
            bandwidth=not args.no_bandwidth,
            engine_dir=args.engine_dir,
            progress=lambda message: print(message, file=sys.stderr),
        )
        print(format_table(report))
        if args.json:
            report.to_json(args.json)
            print(f"wrote {args.json}")
        if args.png:
            print(f"wrote {plot_report(report, args.png)}")
    except (GraphfuseError, OSError, ImportError) as exc:
        if args.debug:
            raise
        print(f"compare_latency: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
