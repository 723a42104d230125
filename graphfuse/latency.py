"""Latency harness: model A (e.g. original) vs model B (e.g. fused) on the backends present.

Method, per scenario:
- feeds built from each model's own inputs (`input_ids`, `attention_mask`, `position_ids`,
  `past.{i}.key/value` = [batch, kv_heads, past_len, head_dim]; a model with fewer past inputs,
  because some layers lost their attention, simply gets fewer);
- sessions pinned: `threads` intra-op threads, 1 inter-op thread, sequential execution; on GPU
  backends the inputs are bound on the device once (I/O binding) and the session's first
  provider must be the one asked for (onnxruntime-gpu falls back to the CPU silently);
- warm-up, then `pairs` A/B pairs whose order alternates (AB, BA, ...) so drift and cache
  effects hit both models alike; each pair gives a ratio A time / B time;
- reported: median and p90 of each model, the median of the per-pair ratios (the headline:
  > 1 means B is faster) and the ratio of the medians.

A memory-bandwidth probe (numpy streaming reads over buffers far larger than the last-level
cache, best of several, on `threads` threads) gives the roofline of a decode step: weight bytes
+ KV-cache bytes / bandwidth; each decode result says which fraction of it was reached.

Backends: "ort-cpu" (default), "ort-cuda", "ort-trt" (ONNX Runtime's CUDA / TensorRT execution
providers) and "trt" (native TensorRT engines built by graphfuse.tensorrt, one static profile per
scenario). Output: `format_table`, `LatencyReport.to_json`, `plot_report` (matplotlib, lazily).
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    import onnxruntime as ort

BACKENDS = {
    "ort-cpu": "CPUExecutionProvider",
    "ort-cuda": "CUDAExecutionProvider",
    "ort-trt": "TensorrtExecutionProvider",
    "trt": None,  # native TensorRT engines
}


# ----------------------------------------------------------------------------------------------
# Scenarios and feeds
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """`tokens` new tokens per sequence on top of a KV cache of `past` tokens."""

    name: str
    batch: int
    tokens: int
    past: int

    @property
    def is_decode(self) -> bool:
        return self.tokens == 1


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("decode-128", batch=1, tokens=1, past=128),
        Scenario("decode-1024", batch=1, tokens=1, past=1024),
        Scenario("prefill-128", batch=1, tokens=128, past=0),
        Scenario("prefill-512", batch=1, tokens=512, past=0),
        Scenario("decode-b32", batch=32, tokens=1, past=128),
    )
}

_PAST = re.compile(r"^past(?:_key_values)?[._](\d+)[._](key|value)$")
_NUMPY_TYPES: dict[int, np.dtype[Any]] = {
    onnx.TensorProto.FLOAT: np.dtype(np.float32),
    onnx.TensorProto.FLOAT16: np.dtype(np.float16),
    onnx.TensorProto.DOUBLE: np.dtype(np.float64),
    onnx.TensorProto.INT64: np.dtype(np.int64),
    onnx.TensorProto.INT32: np.dtype(np.int32),
    onnx.TensorProto.BOOL: np.dtype(np.bool_),
}


def scenario(name: str) -> Scenario:
    if name not in SCENARIOS:
        raise GraphfuseError(f"unknown scenario {name!r}: choose from {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def _load_structure(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise GraphfuseError(f"ONNX file not found: {path}")
    return onnx.load(str(path), load_external_data=False)  # shapes only, not weights


def _vocab_size(model: onnx.ModelProto, default: int = 32) -> int:
    """Rows of the embedding table that `input_ids` indexes (a Gather on an initializer)."""
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        reads_ids = node.op_type == "Gather" and list(node.input[1:2]) == ["input_ids"]
        if reads_ids and dims.get(node.input[0]):
            return int(dims[node.input[0]][0])
    return default


def _dim(value: onnx.TensorShapeProto.Dimension, axis: int, name: str, s: Scenario) -> int:
    """Resolve one dimension of input `name` for scenario `s`."""
    if value.HasField("dim_value"):
        return int(value.dim_value)
    symbol = value.dim_param.lower()
    if "batch" in symbol:
        return s.batch
    if "past" in symbol:
        return s.past
    if any(k in symbol for k in ("total", "all", "attn", "mask", "kv")):
        return s.past + s.tokens
    if any(k in symbol for k in ("seq", "sequence", "len", "token")):
        return s.tokens
    if axis == 0:
        return s.batch
    if axis == 1:
        return s.tokens
    raise GraphfuseError(
        f"cannot size dimension {axis} ({value.dim_param or 'unnamed'}) of input {name!r}; "
        "pass feeds explicitly"
    )


def make_feeds(
    model: onnx.ModelProto | str | Path, s: Scenario, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """Inputs for one step of scenario `s`, built from the model's input names and shapes."""
    proto = _load_structure(model)
    initializers = {t.name for t in proto.graph.initializer}
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for info in proto.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dtype = _NUMPY_TYPES.get(tensor_type.elem_type)
        if dtype is None:
            raise GraphfuseError(
                f"input {info.name!r} has type "
                f"{onnx.TensorProto.DataType.Name(tensor_type.elem_type)}; pass feeds explicitly"
            )
        name = info.name
        dims = list(tensor_type.shape.dim)
        if name in ("input_ids", "tokens"):
            feeds[name] = rng.integers(0, _vocab_size(proto), (s.batch, s.tokens)).astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((s.batch, s.past + s.tokens), dtype)
        elif name == "position_ids":
            positions = np.arange(s.past, s.past + s.tokens)
            feeds[name] = np.broadcast_to(positions, (s.batch, s.tokens)).astype(dtype)
        elif name == "cache_position":
            feeds[name] = np.arange(s.past, s.past + s.tokens).astype(dtype)
        elif _PAST.match(name):
            if len(dims) != 4 or not all(d.HasField("dim_value") for d in (dims[1], dims[3])):
                raise GraphfuseError(
                    f"{name!r} must be [batch, kv_heads, past_len, head_dim] with static "
                    "kv_heads and head_dim"
                )
            kv_shape = (s.batch, dims[1].dim_value, s.past, dims[3].dim_value)
            feeds[name] = rng.standard_normal(kv_shape).astype(dtype)
        else:
            shape = tuple(_dim(d, axis, name, s) for axis, d in enumerate(dims))
            if np.issubdtype(dtype, np.floating):
                feeds[name] = rng.standard_normal(shape).astype(dtype)
            elif dtype == np.bool_:
                feeds[name] = np.ones(shape, dtype)
            else:
                feeds[name] = np.zeros(shape, dtype)
    return feeds


def weight_bytes(model: onnx.ModelProto | str | Path) -> int:
    """Bytes of the model's initializers (and Constant nodes), read without loading weights."""
    proto = _load_structure(model)
    total = 0
    tensors = list(proto.graph.initializer)
    for node in proto.graph.node:
        tensors += [a.t for a in node.attribute if a.type == onnx.AttributeProto.TENSOR]
    for tensor in tensors:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        bits = _element_bits(tensor.data_type)
        total += (count * bits + 7) // 8
    return total


def _element_bits(data_type: int) -> int:
    if data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1):
        return 4
    try:
        return 8 * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except Exception:
        return 0  # strings and other non-numeric tensors: not weights


# ----------------------------------------------------------------------------------------------
# Memory bandwidth
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    read_gbps: float  # streaming read, the roofline's denominator
    copy_gbps: float  # read + write, bytes counted both ways
    buffer_mib: int
    threads: int


def measure_bandwidth(*, buffer_mib: int = 256, repeats: int = 5, threads: int = 1) -> Bandwidth:
    """Streaming memory bandwidth of this machine, best of `repeats`, on `threads` threads.

    Reads are a max-reduction over a float32 buffer (no BLAS, no extra thread pool); numpy
    releases the GIL inside the reduction, so `threads` workers each streaming one slice add up.
    Keep `buffer_mib` far above the last-level cache (tens of MiB on servers).
    """
    if buffer_mib < 64:
        raise GraphfuseError("use a bandwidth buffer of at least 64 MiB (far above the LLC)")
    threads = max(1, threads)
    count = buffer_mib * 2**20 // 4
    source = np.ones(count, dtype=np.float32)
    target = np.empty_like(source)
    slices = np.array_split(np.arange(count), threads)
    bounds = [(int(part[0]), int(part[-1]) + 1) for part in slices if part.size]

    def read(bound: tuple[int, int]) -> None:
        np.maximum.reduce(source[bound[0] : bound[1]])

    def copy(bound: tuple[int, int]) -> None:
        np.copyto(target[bound[0] : bound[1]], source[bound[0] : bound[1]])

    def best(kernel: Callable[[tuple[int, int]], None]) -> float:
        fastest = float("inf")
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in range(repeats):
                start = time.perf_counter()
                list(pool.map(kernel, bounds))
                fastest = min(fastest, time.perf_counter() - start)
        return fastest

    read_s, copy_s = best(read), best(copy)
    return Bandwidth(
        read_gbps=source.nbytes / read_s / 1e9,
        copy_gbps=2 * source.nbytes / copy_s / 1e9,
        buffer_mib=buffer_mib,
        threads=threads,
    )


# ----------------------------------------------------------------------------------------------
# Sessions and runners
# ----------------------------------------------------------------------------------------------


def create_session(
    model: str | Path | onnx.ModelProto,
    backend: str = "ort-cpu",
    *,
    threads: int = 1,
    optimize: bool = True,
    provider_options: Mapping[str, Any] | None = None,
) -> ort.InferenceSession:
    """An ONNX Runtime session pinned for timing, whose first provider is the one asked for."""
    import onnxruntime as ort

    if backend not in BACKENDS or BACKENDS[backend] is None:
        raise GraphfuseError(
            f"backend {backend!r} is not an ONNX Runtime backend: choose ort-cpu, ort-cuda or "
            "ort-trt"
        )
    provider = str(BACKENDS[backend])
    available = ort.get_available_providers()
    if provider not in available:
        raise GraphfuseError(
            f"{provider} is not available in this onnxruntime build (it has "
            f"{', '.join(available)}); install onnxruntime-gpu with matching CUDA libraries, "
            "or use --backend ort-cpu"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # the provider check below reports fall-backs itself
    providers: list[Any] = [(provider, dict(provider_options or {}))]
    if provider == "TensorrtExecutionProvider":
        providers.append("CUDAExecutionProvider")  # for nodes TensorRT does not take
    if provider != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as exc:
        raise GraphfuseError(
            f"onnxruntime could not load the model with {provider}: {exc}"
        ) from None
    first = session.get_providers()[0]
    if first != provider:
        raise GraphfuseError(
            f"onnxruntime fell back to {first} instead of {provider} (CUDA/cuDNN/TensorRT "
            "libraries missing or no GPU?); refusing to time the wrong device"
        )
    return session


Runner = Callable[[], None]


def _ort_runner(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], backend: str
) -> Runner:
    if backend == "ort-cpu":
        inputs = dict(feeds)
        return lambda: session.run(None, inputs) and None
    import onnxruntime as ort

    binding = session.io_binding()
    on_device = [
        ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v), "cuda", 0) for v in feeds.values()
    ]
    for name, value in zip(feeds, on_device, strict=True):
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)  # synchronises the device before returning
        _ = on_device  # keep the device buffers alive as long as the runner

    return run


def _trt_runner(
    onnx_path: Path, feeds: Mapping[str, np.ndarray], engine_dir: Path, label: str, s: Scenario
) -> Runner:
    from graphfuse.tensorrt import ShapeProfile, bind_engine, build_engine

    engine_path = engine_dir / f"{label}-{s.name}.plan"
    shapes = {name: tuple(value.shape) for name, value in feeds.items()}
    build_engine(
        onnx_path,
        engine_path,
        profiles=[ShapeProfile.static(shapes)],
        timing_cache=engine_dir / "timing.cache",
    )
    return bind_engine(engine_path, feeds)  # feeds on the device once: a run is enqueue + sync


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int

    @classmethod
    def of(cls, times_ms: Sequence[float]) -> TimingStats:
        values = np.asarray(times_ms, dtype=np.float64)
        return cls(
            median_ms=float(np.median(values)),
            p90_ms=float(np.percentile(values, 90)),
            mean_ms=float(values.mean()),
            min_ms=float(values.min()),
            runs=int(values.size),
        )


@dataclass(frozen=True)
class ScenarioResult:
    scenario: str
    a: TimingStats
    b: TimingStats
    ratio_median: float  # median over pairs of (A time / B time); > 1: B is faster
    ratio_of_medians: float
    pairs: int
    roofline_a_ms: float | None = None  # decode only: (weights + KV cache) / bandwidth
    roofline_b_ms: float | None = None

    @property
    def roofline_fraction_a(self) -> float | None:
        return self.roofline_a_ms / self.a.median_ms if self.roofline_a_ms else None

    @property
    def roofline_fraction_b(self) -> float | None:
        return self.roofline_b_ms / self.b.median_ms if self.roofline_b_ms else None


@dataclass
class LatencyReport:
    model_a: str
    model_b: str
    labels: tuple[str, str]
    backend: str
    threads: int
    warmup: int
    weight_bytes_a: int
    weight_bytes_b: int
    bandwidth: Bandwidth | None
    results: list[ScenarioResult] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for result, entry in zip(self.results, data["results"], strict=True):
            entry["roofline_fraction_a"] = result.roofline_fraction_a
            entry["roofline_fraction_b"] = result.roofline_fraction_b
        return data

    def to_json(self, path: str | Path | None = None) -> str:
        return dump_json(self.as_dict(), path)


def dump_json(data: dict[str, Any], path: str | Path | None = None) -> str:
    """A report as indented JSON, also written to ``path`` when given."""
    text = json.dumps(data, indent=2)
    if path is not None:
        Path(path).write_text(text + "\n")
    return text


def time_pairs(
    run_a: Runner, run_b: Runner, *, pairs: int, warmup: int
) -> tuple[list[float], list[float]]:
    """Per-run milliseconds of A and B over `pairs` interleaved pairs (order alternates)."""
    if pairs < 1:
        raise GraphfuseError("need at least one A/B pair")
    for _ in range(warmup):
        run_a()
        run_b()
    times_a: list[float] = []
    times_b: list[float] = []
    clock = time.perf_counter_ns
    for index in range(pairs):
        order = ((run_a, times_a), (run_b, times_b))
        for run, sink in order if index % 2 == 0 else order[::-1]:
            start = clock()
            run()
            sink.append((clock() - start) / 1e6)
    return times_a, times_b


def _kv_bytes(feeds: Mapping[str, np.ndarray]) -> int:
    return sum(v.nbytes for k, v in feeds.items() if _PAST.match(k))


def compare_latency(
    model_a: str | Path,
    model_b: str | Path,
    *,
    scenarios: Sequence[str | Scenario] = ("decode-128",),
    backend: str = "ort-cpu",
    threads: int = 1,
    pairs: int = 200,
    warmup: int = 20,
    labels: tuple[str, str] = ("A", "B"),
    bandwidth: Bandwidth | bool | None = True,
    engine_dir: str | Path | None = None,
    optimize: bool = True,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> LatencyReport:
    """Time model A against model B on each scenario; see the module docstring for the method.

    `bandwidth`: True measures it (for the decode roofline), False skips it, or pass a
    `Bandwidth` measured before. `engine_dir` (backend "trt") keeps the built engines.
    """
    import onnxruntime as ort

    if backend not in BACKENDS:
        raise GraphfuseError(f"unknown backend {backend!r}: choose from {', '.join(BACKENDS)}")
    if threads < 1:
        raise GraphfuseError("threads must be >= 1")
    path_a, path_b = Path(model_a), Path(model_b)
    for path in (path_a, path_b):
        if not path.is_file():
            raise GraphfuseError(f"ONNX file not found: {path}")
    chosen = [scenario(s) if isinstance(s, str) else s for s in scenarios]
    proto_a, proto_b = _load_structure(path_a), _load_structure(path_b)

    if bandwidth is True:
        measured: Bandwidth | None = measure_bandwidth(threads=threads)
    elif isinstance(bandwidth, Bandwidth):
        measured = bandwidth
    else:
        measured = None

    report = LatencyReport(
        model_a=str(path_a),
        model_b=str(path_b),
        labels=labels,
        backend=backend,
        threads=threads,
        warmup=warmup,
        weight_bytes_a=weight_bytes(proto_a),
        weight_bytes_b=weight_bytes(proto_b),
        bandwidth=measured,
        machine={
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "onnxruntime": ort.__version__,
        },
    )

    sessions: dict[str, ort.InferenceSession] = {}
    if backend != "trt":
        sessions = {
            label: create_session(path, backend, threads=threads, optimize=optimize)
            for label, path in zip(labels, (path_a, path_b), strict=True)
        }
    with tempfile.TemporaryDirectory(prefix="graphfuse-engines-") as scratch:
        engines = Path(engine_dir) if engine_dir is not None else Path(scratch)
        for s in chosen:
            if progress:
                progress(f"{s.name}: {pairs} pairs on {backend}")
            feeds = [make_feeds(p, s, seed=seed) for p in (proto_a, proto_b)]
            if backend == "trt":
                engines.mkdir(parents=True, exist_ok=True)
                runners = [
                    _trt_runner(path, f, engines, label, s)
                    for path, f, label in zip((path_a, path_b), feeds, labels, strict=True)
                ]
            else:
                runners = [
                    _ort_runner(sessions[label], f, backend)
                    for label, f in zip(labels, feeds, strict=True)
                ]
            times_a, times_b = time_pairs(runners[0], runners[1], pairs=pairs, warmup=warmup)
            ratios = [a / b for a, b in zip(times_a, times_b, strict=True) if b > 0]
            stats_a, stats_b = TimingStats.of(times_a), TimingStats.of(times_b)
            roofline: list[float | None] = [None, None]
            if measured is not None and s.is_decode:
                roofline = [
                    (weights + _kv_bytes(f)) / (measured.read_gbps * 1e9) * 1e3
                    for weights, f in zip(
                        (report.weight_bytes_a, report.weight_bytes_b), feeds, strict=True
                    )
                ]
            report.results.append(
                ScenarioResult(
                    scenario=s.name,
                    a=stats_a,
                    b=stats_b,
                    ratio_median=float(statistics.median(ratios)),
                    ratio_of_medians=stats_a.median_ms / stats_b.median_ms,
                    pairs=pairs,
                    roofline_a_ms=roofline[0],
                    roofline_b_ms=roofline[1],
                )
            )
    return report


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return f"{100 * value:.0f}%" if value is not None else "-"


def format_table(report: LatencyReport) -> str:
    """A plain-text table: medians, p90s, ratios and roofline fractions per scenario."""
    la, lb = report.labels
    header = (
        f"{'scenario':<12} {la + ' med':>10} {la + ' p90':>10} {lb + ' med':>10} {lb + ' p90':>10}"
        f" {'ratio':>7} {'ratio med':>9} {'roof ' + la:>8} {'roof ' + lb:>8}"
    )
    lines = [
        f"{la}: {report.model_a} ({report.weight_bytes_a / 2**20:.1f} MiB of weights)",
        f"{lb}: {report.model_b} ({report.weight_bytes_b / 2**20:.1f} MiB of weights)",
        f"backend {report.backend}, {report.threads} intra-op thread(s), warm-up {report.warmup}",
    ]
    if report.bandwidth is not None:
        bw = report.bandwidth
        lines.append(
            f"memory bandwidth: {bw.read_gbps:.1f} GB/s read, {bw.copy_gbps:.1f} GB/s copy "
            f"({bw.threads} thread(s), {bw.buffer_mib} MiB buffer)"
        )
    lines += ["", header, "-" * len(header)]
    for r in report.results:
        lines.append(
            f"{r.scenario:<12} {r.a.median_ms:>8.3f}ms {r.a.p90_ms:>8.3f}ms {r.b.median_ms:>8.3f}ms"
            f" {r.b.p90_ms:>8.3f}ms {r.ratio_median:>7.3f} {r.ratio_of_medians:>9.3f}"
            f" {_pct(r.roofline_fraction_a):>8} {_pct(r.roofline_fraction_b):>8}"
        )
    lines += [
        "",
        f"ratio = median over pairs of {la} time / {lb} time (> 1: {lb} is faster); "
        "ratio med = ratio of the medians;",
        "roof = decode roofline (weights + KV cache at the measured read bandwidth) / median time",
        "       (over 100%: the working set fits in the CPU caches, no DRAM roofline applies)",
    ]
    return "\n".join(lines)


def plot_report(report: LatencyReport, path: str | Path) -> Path:
    """One panel per scenario (own scale): median bars with p90 whiskers, the decode roofline
    dotted, the median per-pair ratio in the panel title. Written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    la, lb = report.labels
    count = max(1, len(report.results))
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count + 1.2, 3.8), squeeze=False)
    for ax, r in zip(axes[0], report.results, strict=False):
        stats = (r.a, r.b)
        ax.bar(
            [la, lb],
            [st.median_ms for st in stats],
            yerr=[[0.0, 0.0], [st.p90_ms - st.median_ms for st in stats]],
            capsize=4,
            color=["#95a5a6", "#2e86c1"],
        )
        for position, roof in enumerate((r.roofline_a_ms, r.roofline_b_ms)):
            if roof:
                ax.hlines(roof, position - 0.4, position + 0.4, colors="black", linestyles=":")
        ax.set_title(f"{r.scenario}\n{la}/{lb} = {r.ratio_median:.2f}", fontsize=10)
        roofs = [roof for roof in (r.roofline_a_ms, r.roofline_b_ms) if roof]
        ax.set_ylim(0, max([st.p90_ms for st in stats] + roofs) * 1.15)
        ax.tick_params(labelsize=9)
    axes[0][0].set_ylabel("ms per step (median, whisker: p90)")
    note = "dotted: decode roofline; " if any(r.roofline_a_ms for r in report.results) else ""
    fig.suptitle(
        f"{report.backend}, {report.threads} thread(s); {note}ratio: median over "
        f"{report.results[0].pairs if report.results else 0} interleaved pairs",
        fontsize=9,
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def compare(
    model_a: str | Path,
    model_b: str | Path,
    *,
    png: str | Path | None = None,
    json_path: str | Path | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`compare_latency` for scripts: the report as a plain dict, optionally written as a PNG
    chart and as JSON. `options` are those of `compare_latency`."""
    report = compare_latency(model_a, model_b, **options)
    if png is not None:
        plot_report(report, png)
    if json_path is not None:
        report.to_json(json_path)
    return report.as_dict()


__all__ = [
    "BACKENDS",
    "SCENARIOS",
    "Bandwidth",
    "LatencyReport",
    "Scenario",
    "ScenarioResult",
    "TimingStats",
    "compare",
    "compare_latency",
    "create_session",
    "format_table",
    "make_feeds",
    "measure_bandwidth",
    "plot_report",
    "scenario",
    "time_pairs",
    "weight_bytes",
]
