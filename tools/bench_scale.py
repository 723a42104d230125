"""Scale benchmark: fuse a model of several GB of external-data weights within bounded memory,
and time `inspect` + `fuse` against depth.

    python tools/bench_scale.py                 # ≥ 4 GB model, then depths 32 … 126
    python tools/bench_scale.py --gb 0.3        # a quick look

Part 1 writes a synthetic stack (toy attention every `--run` blocks, so the largest fused run is
known) whose weights live in one external data file, fuses it in a child process (`graphfuse
fuse`) and reads the child's peak RSS from the kernel. Bound: 2 × the weights of the largest
fused run + 500 MB. It then deletes the input's data file and runs the fused model in ONNX
Runtime: the output's weights must live beside the output.

Part 2 builds narrow graphs of growing depth (126 blocks = Llama-3.1-405B's depth) and times
`inspect` + `fuse`, reporting time per block: linear growth keeps it flat.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from graphfuse.models.synthetic import build

MB = 1 << 20


def write_big_model(
    folder: Path, hidden: int, inter: int, blocks: int, run: int
) -> tuple[Path, int]:
    """The synthetic stack with its weights streamed into ``model.onnx.data`` chunk by chunk
    (never all in memory). Returns the path and the weight bytes."""
    skeleton = build(4, [4] * blocks, attention_after=set(range(run - 1, blocks - 1, run)), seed=0)
    model = skeleton.model
    shapes = {}
    for tensor in model.graph.initializer:  # widen the toy weights to the real sizes
        if tensor.name.endswith(("gate/weight", "up/weight")):
            shapes[tensor.name] = (hidden, inter)
        elif tensor.name.endswith("down/weight"):
            shapes[tensor.name] = (inter, hidden)
        elif tensor.name.endswith(("/q", "/k", "/v")):
            shapes[tensor.name] = (hidden, hidden)
        elif tensor.name.endswith("gamma"):
            shapes[tensor.name] = (hidden,)
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[2].dim_value = hidden
    data = folder / "model.onnx.data"
    total = 0
    rng = np.random.default_rng(0)
    with open(data, "wb") as f:
        for tensor in model.graph.initializer:
            if tensor.name not in shapes:
                continue
            shape = shapes[tensor.name]
            offset = f.tell()
            if len(shape) == 1:
                array = (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
                f.write(array.tobytes())
            else:  # row by row: a few MB in flight
                scale = shape[0] ** -0.5
                for _ in range(shape[0]):
                    f.write((rng.standard_normal(shape[1], dtype=np.float32) * scale).tobytes())
            length = f.tell() - offset
            total += length
            tensor.ClearField("raw_data")
            del tensor.dims[:]
            tensor.dims.extend(shape)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data.name), ("offset", offset), ("length", length)):
                tensor.external_data.add(key=key, value=str(value))
    path = folder / "model.onnx"
    onnx.save(model, path)
    return path, total


def scale(args: argparse.Namespace, work: Path) -> dict:
    hidden, inter = args.hidden, args.inter
    block_bytes = 3 * hidden * inter * 4
    blocks = max(args.run, int(np.ceil(args.gb * 1e9 / block_bytes)))
    blocks = -(-blocks // args.run) * args.run  # whole runs
    src, out = work / "in", work / "out"
    src.mkdir()
    out.mkdir()
    t0 = time.perf_counter()
    path, weight_bytes = write_big_model(src, hidden, inter, blocks, args.run)
    written = time.perf_counter() - t0
    print(f"wrote {blocks} blocks, {weight_bytes / 1e9:.2f} GB of weights in {written:.0f} s")

    fused = out / "fused.onnx"
    t0 = time.perf_counter()
    child = subprocess.run(
        [sys.executable, "-m", "graphfuse.cli", "fuse", str(path), "-o", str(fused), "--json"],
        capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    if child.returncode != 0:
        raise SystemExit(f"fuse failed: {child.stderr.strip()}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # kB on Linux
    report = json.loads(child.stdout)
    largest_run = args.run * block_bytes
    bound = 2 * largest_run + 500 * MB

    (src / "model.onnx.data").unlink()  # the fused model must not need the input's data
    import onnxruntime as ort

    session = ort.InferenceSession(str(fused), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 2, hidden)).astype(np.float32)
    y = session.run(None, {"x": x})[0]
    beside = sorted(p.name for p in out.iterdir())
    result = {
        "blocks": blocks,
        "weight_gb": weight_bytes / 1e9,
        "runs_fused": report["runs_fused"],
        "largest_run_mb": largest_run / MB,
        "fuse_seconds": seconds,
        "peak_rss_mb": peak / MB,
        "bound_mb": bound / MB,
        "within_bound": peak < bound,
        "output_files": beside,
        "fused_runs_after_input_data_deleted": bool(np.isfinite(y).all()),
    }
    print(
        f"fuse: {seconds:.0f} s, peak RSS {peak / MB:,.0f} MB, bound 2 × {largest_run / MB:,.0f}"
        f" + 500 = {bound / MB:,.0f} MB -> {'OK' if peak < bound else 'OVER'}; output files "
        f"{beside}; fused model runs with the input's data deleted: "
        f"{result['fused_runs_after_input_data_deleted']}"
    )
    return result


def depth(args: argparse.Namespace, work: Path) -> dict:
    import graphfuse

    rows = []
    for blocks in args.depths:
        model = build(64, [128] * blocks, attention_after=set(range(5, blocks - 1, 6)), seed=0)
        path = work / f"depth{blocks}.onnx"
        onnx.save(model.model, path)
        t0 = time.perf_counter()
        found = graphfuse.inspect(path)
        t1 = time.perf_counter()
        graphfuse.fuse_file(path, work / f"depth{blocks}_fused.onnx", "all")
        t2 = time.perf_counter()
        rows.append({"blocks": blocks, "found": len(found.blocks), "inspect_s": t1 - t0,
                     "fuse_s": t2 - t1, "ms_per_block": 1e3 * (t2 - t0) / blocks})  # fmt: skip
        print(f"depth {blocks:>4}: inspect {t1 - t0:5.2f} s, fuse {t2 - t1:5.2f} s, "
              f"{rows[-1]['ms_per_block']:.1f} ms per block")  # fmt: skip
    per_block = [r["ms_per_block"] for r in rows]
    return {"rows": rows, "per_block_spread": max(per_block) / min(per_block),
            "total_s": sum(r["inspect_s"] + r["fuse_s"] for r in rows)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=4.2, help="weights of the big model")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=5632)
    parser.add_argument("--run", type=int, default=6, help="blocks per attention-free run")
    parser.add_argument("--depths", type=int, nargs="+", default=[32, 63, 126])
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="graphfuse-bench-"))
    try:
        results = {}
        if not args.skip_scale:
            results["scale"] = scale(args, work)
        results["depth"] = depth(args, work)
        print(f"depth: total {results['depth']['total_s']:.1f} s; time per block varies "
              f"×{results['depth']['per_block_spread']:.2f} from depth 32 to 126")  # fmt: skip
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
