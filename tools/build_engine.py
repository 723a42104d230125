"""Build a TensorRT engine from an ONNX file: a thin trtexec-like CLI over graphfuse.tensorrt
(Polygraphy's loaders underneath).

    python tools/build_engine.py --onnx model.onnx --saveEngine model.plan \\
        --shapes input_ids:1x1,past.0.key:1x3x128x64 --workspace 4096 \\
        --timingCache timing.cache --dumpLayerInfo layers.json

Errors print one line and exit 2 (the traceback only with --debug); Polygraphy's and TensorRT's
warnings and errors go to stderr before it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from graphfuse.errors import GraphfuseError
from graphfuse.tensorrt import ShapeProfile, build_engine, parse_shapes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="build_engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx", type=Path, required=True, help="ONNX model (external data beside it)")
    p.add_argument("--saveEngine", type=Path, required=True, help="serialized engine to write")
    shapes = p.add_argument_group("input shapes (NAME:DxD,NAME:DxDxD as trtexec)")
    shapes.add_argument("--shapes", help="static shapes: min = opt = max")
    shapes.add_argument("--minShapes", help="minimum shapes of the dynamic inputs")
    shapes.add_argument("--optShapes", help="shapes to tune for")
    shapes.add_argument("--maxShapes", help="maximum shapes")
    build = p.add_argument_group("build")
    build.add_argument("--workspace", type=int, metavar="MiB", help="workspace memory pool limit")
    build.add_argument("--timingCache", type=Path, help="timing cache file: read, then updated")
    build.add_argument("--dumpLayerInfo", type=Path, metavar="JSON", help="write layer info")
    build.add_argument(
        "--fp16",
        action="store_true",
        help="TensorRT 10 weakly typed networks only (implies --weaklyTyped)",
    )
    build.add_argument(
        "--bf16",
        action="store_true",
        help="TensorRT 10 weakly typed networks only (implies --weaklyTyped)",
    )
    build.add_argument(
        "--weaklyTyped",
        action="store_true",
        help="TensorRT 10: do not create a strongly typed network (TensorRT 11 always is)",
    )
    p.add_argument("--verbose", action="store_true", help="print TensorRT's and Polygraphy's log")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def _profiles(args: argparse.Namespace) -> list[ShapeProfile]:
    ranged = [args.minShapes, args.optShapes, args.maxShapes]
    if args.shapes and any(ranged):
        raise GraphfuseError(
            "give either --shapes or --minShapes/--optShapes/--maxShapes, not both"
        )
    if args.shapes:
        return [ShapeProfile.static(parse_shapes(args.shapes))]
    if any(ranged):
        if not all(ranged):
            raise GraphfuseError("--minShapes, --optShapes and --maxShapes go together")
        return [ShapeProfile(*(parse_shapes(spec) for spec in ranged))]
    return []


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = build_engine(
            args.onnx,
            args.saveEngine,
            profiles=_profiles(args),
            workspace_mib=args.workspace,
            timing_cache=args.timingCache,
            layer_info=args.dumpLayerInfo,
            strongly_typed=not (args.weaklyTyped or args.fp16 or args.bf16),
            fp16=args.fp16,
            bf16=args.bf16,
            verbose=args.verbose,
        )
    except (GraphfuseError, OSError) as exc:
        if args.debug:
            raise
        print(f"build_engine: error: {exc}", file=sys.stderr)
        return 2
    typing = "strongly typed" if result.strongly_typed else "weakly typed"
    print(
        f"wrote {result.engine_path} ({result.engine_path.stat().st_size / 2**20:.1f} MiB, "
        f"TensorRT {result.tensorrt_version}, {typing}, built in {result.build_seconds:.1f} s)"
    )
    for extra in (result.timing_cache, result.layer_info):
        if extra is not None:
            print(f"wrote {extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
