"""Build and time native TensorRT engines from ONNX files, in the spirit of trtexec / Polygraphy.

    ONNX file (+ external data) --OnnxParser.parse_from_file--> INetworkDefinition
        --IBuilderConfig (profiles, workspace, timing cache, verbosity)--> serialized engine
        --written atomically--> engine file (+ timing cache, + layer information as JSON)

TensorRT is imported inside the functions that need it, so this module imports (and the rest of
graphfuse works) where TensorRT is absent; `probe()` says in one line what is missing.

TensorRT 10 vs 11 (only calls documented in both are made; the rest is probed with hasattr):
- Networks are strongly typed by default in 11, where NetworkDefinitionCreationFlag.STRONGLY_TYPED
  is deprecated and ignored; on 10 the flag is set when `strongly_typed=True` (the default).
- BuilderFlag.FP16 / BuilderFlag.BF16 exist only in 10 and only act on weakly typed networks. On
  11 precision comes from the ONNX tensor types: convert the model first (`graphfuse.convert`).
- The inspector's JSON lists "Bindings" in 10 and "I/O Tensors" in 11; it is written verbatim.

Engines run with torch.cuda device buffers and one CUDA stream (torch imported lazily).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

Shape = tuple[int, ...]

NO_TENSORRT = "TensorRT is not installed"
NO_LIBNVINFER = "TensorRT bindings present but libnvinfer missing"
NO_GPU = "no CUDA device"


# ----------------------------------------------------------------------------------------------
# Availability
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRTStatus:
    """What `probe()` found; `available` is True only where an engine can be built."""

    available: bool
    message: str
    version: str | None = None


class _Unavailable(Exception):
    """TensorRT cannot be used here; str(self) is the one-line reason."""


def _load_tensorrt() -> str:
    """Make `import tensorrt` yield working bindings and return the version, or _Unavailable.

    `tensorrt` is normally a thin package re-exporting `tensorrt_bindings`. Two look-alikes must
    not be taken for it: the namespace package that type stubs (tensorrt-stubs) leave behind,
    which has no `Builder`, and the bindings wheel alone, which cannot load libnvinfer.
    """
    try:
        import tensorrt as module

        usable = hasattr(module, "Builder")
    except ModuleNotFoundError as exc:
        if exc.name != "tensorrt":
            raise _Unavailable(f"{NO_LIBNVINFER} ({exc})") from exc
        usable = False
    except (ImportError, OSError) as exc:
        raise _Unavailable(f"{NO_LIBNVINFER} ({exc})") from exc
    if not usable:
        try:
            import tensorrt_bindings
        except ModuleNotFoundError as exc:
            if exc.name != "tensorrt_bindings":
                raise _Unavailable(f"{NO_LIBNVINFER} ({exc})") from exc
            raise _Unavailable(
                f"{NO_TENSORRT} (install TensorRT 10 or 11 with its libraries on a machine with "
                "an NVIDIA GPU)"
            ) from exc
        except (ImportError, OSError) as exc:
            raise _Unavailable(f"{NO_LIBNVINFER} ({exc})") from exc
        if not hasattr(tensorrt_bindings, "Builder"):  # type stubs alone: a namespace package
            raise _Unavailable(f"{NO_TENSORRT} (only type stubs are installed)")
        # Working bindings without the `tensorrt` wrapper (system libnvinfer + bindings wheel):
        # register them under the name this module imports, as the wrapper itself would.
        sys.modules["tensorrt"] = tensorrt_bindings
    import tensorrt

    version = str(getattr(tensorrt, "__version__", "0"))
    if _major_minor(version)[0] < 10:
        raise _Unavailable(f"TensorRT {version} is too old: graphfuse needs TensorRT 10 or 11")
    return version


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


class _LogSink:
    """A TensorRT logger (`.logger`) that also keeps the error messages for one-line reports."""

    def __init__(self, verbose: bool = False) -> None:
        import tensorrt as trt

        self.errors: list[str] = []
        self.verbose = verbose
        sink = self

        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)

            def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
                errors = (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR)
                if severity in errors:
                    sink.errors.append(msg)
                if sink.verbose or severity in (*errors, trt.ILogger.Severity.WARNING):
                    print(f"[TensorRT] {msg}", file=sys.stderr)

        self.logger: trt.ILogger = Logger()

    def last_error(self, default: str = "no error message") -> str:
        return self.errors[-1] if self.errors else default


def _create_builder(log: _LogSink) -> trt.Builder:
    """trt.Builder, or _Unavailable("no CUDA device ...") when it cannot start."""
    import tensorrt as trt

    try:
        builder = trt.Builder(log.logger)
    except Exception as exc:  # without a GPU pybind raises "... factory function returned nullptr"
        detail = "; ".join(log.errors) or str(exc)
        raise _Unavailable(f"{NO_GPU} ({detail})") from exc
    if builder is None:  # defensive: older bindings returned None instead of raising
        raise _Unavailable(f"{NO_GPU} ({'; '.join(log.errors) or 'trt.Builder failed'})")
    return builder


def probe() -> TensorRTStatus:
    """Say whether TensorRT engines can be built here and, if not, the one thing missing."""
    try:
        version = _load_tensorrt()
        _create_builder(_LogSink())
    except _Unavailable as exc:
        return TensorRTStatus(False, str(exc))
    return TensorRTStatus(True, f"TensorRT {version} with a CUDA device", version)


def _require_tensorrt(verbose: bool = False) -> tuple[trt.Builder, _LogSink, str]:
    try:
        version = _load_tensorrt()
        log = _LogSink(verbose)
        builder = _create_builder(log)
    except _Unavailable as exc:
        raise GraphfuseError(str(exc)) from None
    return builder, log, version


# ----------------------------------------------------------------------------------------------
# Shapes and profiles
# ----------------------------------------------------------------------------------------------


def parse_shapes(spec: str) -> dict[str, Shape]:
    """Parse trtexec-style shapes, ``"input_ids:1x128,past.0.key:1x3x128x64"``.

    The name is everything before the last ``:``, so names with colons (``"x:0:1x3"``) work; an
    empty dimension list (``"scalar:"``) is a rank-0 shape.
    """
    shapes: dict[str, Shape] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, dims = item.rpartition(":")
        if not sep or not name:
            raise GraphfuseError(f"bad shape {item!r}: expected NAME:DxDxD, e.g. input_ids:1x128")
        try:
            shape = tuple(int(d) for d in dims.split("x")) if dims else ()
        except ValueError:
            raise GraphfuseError(
                f"bad shape {item!r}: dimensions are integers joined by 'x', e.g. 1x128"
            ) from None
        if any(d < 0 for d in shape):
            raise GraphfuseError(f"bad shape {item!r}: dimensions must be >= 0")
        if name in shapes:
            raise GraphfuseError(f"input {name!r} is given twice in {spec!r}")
        shapes[name] = shape
    if not shapes:
        raise GraphfuseError(f"no shapes in {spec!r}: expected NAME:DxDxD[,NAME:DxD...]")
    return shapes


def _shape(dims: trt.Dims) -> Shape:
    # Dims supports len() and indexing in both 10 and 11; iterate through those.
    return tuple(int(dims[i]) for i in range(len(dims)))


def _fmt(shape: Sequence[int]) -> str:
    return "x".join("?" if d < 0 else str(d) for d in shape)


@dataclass(frozen=True)
class ShapeProfile:
    """One optimisation profile: min/opt/max shape per dynamic input."""

    min: Mapping[str, Shape]
    opt: Mapping[str, Shape]
    max: Mapping[str, Shape]

    @classmethod
    def static(cls, shapes: Mapping[str, Shape]) -> ShapeProfile:
        """min = opt = max, as trtexec --shapes."""
        return cls(dict(shapes), dict(shapes), dict(shapes))

    def __post_init__(self) -> None:
        if set(self.min) != set(self.opt) or set(self.min) != set(self.max):
            raise GraphfuseError(
                "min, opt and max shapes must name the same inputs "
                f"(min: {sorted(self.min)}, opt: {sorted(self.opt)}, max: {sorted(self.max)})"
            )
        for name in self.min:
            lo, mid, hi = self.min[name], self.opt[name], self.max[name]
            if not len(lo) == len(mid) == len(hi):
                raise GraphfuseError(f"input {name!r}: min/opt/max shapes differ in rank")
            if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
                raise GraphfuseError(
                    f"input {name!r}: need min <= opt <= max in every dimension, got "
                    f"{_fmt(lo)} / {_fmt(mid)} / {_fmt(hi)}"
                )


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    build_seconds: float
    tensorrt_version: str
    strongly_typed: bool
    input_shapes: dict[str, Shape] = field(default_factory=dict)  # as declared; -1 = dynamic
    timing_cache: Path | None = None
    layer_info: Path | None = None


@contextlib.contextmanager
def _atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """Write a temporary file beside `path`; rename it into place only when complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_atomic(path: str | Path, data: bytes | memoryview | str) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    with _atomic_writer(Path(path)) as handle:
        handle.write(data.encode() if isinstance(data, str) else data)


def _parse_onnx(network: trt.INetworkDefinition, log: _LogSink, onnx_path: Path) -> None:
    import tensorrt as trt

    # parse_from_file, not parse(bytes): external data then resolves beside the model file.
    parser = trt.OnnxParser(network, log.logger)
    if parser.parse_from_file(str(onnx_path)):
        return
    problems = []
    for i in range(parser.num_errors):
        error = parser.get_error(i)
        op = error.node_operator()
        where = f"node {error.node_name() or error.node()} ({op}): " if op else ""
        problems.append(f"{where}{error.desc()}")
    detail = problems[0] if problems else log.last_error()
    more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    raise GraphfuseError(
        f"TensorRT's ONNX parser rejected {onnx_path.name}: {detail}{more}; "
        "`graphfuse check --target tensorrt` lists what the parser cannot take"
    )


def _network_inputs(network: trt.INetworkDefinition) -> dict[str, Shape]:
    inputs = (network.get_input(i) for i in range(network.num_inputs))
    return {tensor.name: _shape(tensor.shape) for tensor in inputs}


def _add_profiles(
    builder: trt.Builder,
    config: trt.IBuilderConfig,
    inputs: Mapping[str, Shape],
    profiles: Sequence[ShapeProfile],
) -> None:
    import tensorrt as trt

    dynamic = {name: shape for name, shape in inputs.items() if any(d < 0 for d in shape)}
    if dynamic and not profiles:
        listed = ", ".join(f"{name}:{_fmt(shape)}" for name, shape in dynamic.items())
        raise GraphfuseError(
            f"the model has dynamic inputs ({listed}): give their shapes "
            "(--shapes, or --minShapes/--optShapes/--maxShapes)"
        )
    for index, prof in enumerate(profiles):
        unknown = sorted(set(prof.min) - set(inputs))
        if unknown:
            raise GraphfuseError(
                f"profile {index}: {unknown} are not inputs of the network "
                f"(its inputs: {sorted(inputs)})"
            )
        missing = sorted(set(dynamic) - set(prof.min))
        if missing:
            raise GraphfuseError(f"profile {index}: no shape given for dynamic inputs {missing}")
        profile = builder.create_optimization_profile()
        for name in prof.min:
            declared = inputs[name]
            bounds = {"min": prof.min[name], "opt": prof.opt[name], "max": prof.max[name]}
            for label, shape in bounds.items():
                fits = len(shape) == len(declared) and all(
                    d < 0 or d == s for d, s in zip(declared, shape, strict=True)
                )
                if not fits:
                    raise GraphfuseError(
                        f"profile {index}: {label} shape {_fmt(shape)} of {name!r} does not fit "
                        f"its declared shape {_fmt(declared)}"
                    )
            profile.set_shape(
                name,
                trt.Dims(list(prof.min[name])),
                trt.Dims(list(prof.opt[name])),
                trt.Dims(list(prof.max[name])),
            )
        if config.add_optimization_profile(profile) < 0:
            raise GraphfuseError(f"TensorRT refused optimisation profile {index}")


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path,
    *,
    profiles: Sequence[ShapeProfile] = (),
    workspace_mib: int | None = None,
    timing_cache: str | Path | None = None,
    layer_info: str | Path | None = None,
    strongly_typed: bool = True,
    fp16: bool = False,
    bf16: bool = False,
    verbose: bool = False,
) -> BuildResult:
    """Build a TensorRT engine from an ONNX file and write it to `engine_path` atomically.

    - `profiles`: one ShapeProfile per optimisation profile; each covers every dynamic input.
    - `workspace_mib`: limit of the workspace memory pool (MemoryPoolType.WORKSPACE).
    - `timing_cache`: read if the file exists, written back (atomically) after the build.
    - `layer_info`: write the engine inspector's layer information (JSON) there.
    - `strongly_typed`: precision follows the ONNX tensor types (always so on TensorRT 11).
    - `fp16` / `bf16`: TensorRT 10 builder flags for weakly typed networks only.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not onnx_path.is_file():
        raise GraphfuseError(f"ONNX file not found: {onnx_path}")
    if (fp16 or bf16) and strongly_typed:
        raise GraphfuseError(
            "fp16/bf16 builder flags act only on weakly typed networks (TensorRT 10); convert the "
            "model to fp16/bf16 with graphfuse.convert instead"
        )
    if workspace_mib is not None and workspace_mib <= 0:
        raise GraphfuseError(f"the workspace must be a positive number of MiB, got {workspace_mib}")

    builder, log, version = _require_tensorrt(verbose)
    import tensorrt as trt  # importable now: _require_tensorrt checked (and aliased) it

    major, _ = _major_minor(version)

    flags = 0
    if major < 11 and strongly_typed:
        if not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            raise GraphfuseError(f"TensorRT {version} has no strongly typed networks: upgrade")
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    _parse_onnx(network, log, onnx_path)

    config = builder.create_builder_config()
    if workspace_mib is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mib << 20)
    for wanted, flag_name in ((fp16, "FP16"), (bf16, "BF16")):
        if wanted:
            if major >= 11 or not hasattr(trt.BuilderFlag, flag_name):
                raise GraphfuseError(
                    f"TensorRT {version} has no BuilderFlag.{flag_name}: precision comes from the "
                    "ONNX tensor types; convert the model with graphfuse.convert first"
                )
            config.set_flag(getattr(trt.BuilderFlag, flag_name))

    inputs = _network_inputs(network)
    _add_profiles(builder, config, inputs, profiles)

    cache_path = Path(timing_cache) if timing_cache is not None else None
    if cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        if not config.set_timing_cache(config.create_timing_cache(blob), False):
            raise GraphfuseError(f"TensorRT could not use the timing cache {cache_path}")
    info_path = Path(layer_info) if layer_info is not None else None
    if info_path is not None:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if serialized is None:
        raise GraphfuseError(
            f"TensorRT could not build an engine from {onnx_path.name}: {log.last_error()}"
        )
    write_atomic(engine_path, memoryview(serialized))

    if cache_path is not None:
        write_atomic(cache_path, memoryview(config.get_timing_cache().serialize()))
    if info_path is not None:
        engine = trt.Runtime(log.logger).deserialize_cuda_engine(serialized)
        inspector = engine.create_engine_inspector()
        write_atomic(info_path, inspector.get_engine_information(trt.LayerInformationFormat.JSON))

    return BuildResult(
        engine_path=engine_path,
        build_seconds=seconds,
        tensorrt_version=version,
        strongly_typed=major >= 11 or strongly_typed,
        input_shapes=inputs,
        timing_cache=cache_path,
        layer_info=info_path,
    )


# ----------------------------------------------------------------------------------------------
# Running and timing
# ----------------------------------------------------------------------------------------------


class EngineRunner:
    """Run a serialized engine with torch.cuda buffers on one CUDA stream.

    `set_inputs` copies the feeds to the device once; `run_once` enqueues and waits, so a host
    timer around it measures one inference; `outputs` copies the results back.
    """

    def __init__(self, engine_path: str | Path) -> None:
        path = Path(engine_path)
        if not path.is_file():
            raise GraphfuseError(f"engine file not found: {path}")
        try:
            _load_tensorrt()
        except _Unavailable as exc:
            raise GraphfuseError(str(exc)) from None
        import tensorrt as trt
        import torch

        if not torch.cuda.is_available():
            raise GraphfuseError(f"{NO_GPU}: torch.cuda cannot hold the engine's buffers")
        self._log = _LogSink()
        self._runtime = trt.Runtime(self._log.logger)
        engine = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise GraphfuseError(f"TensorRT could not load {path.name}: {self._log.last_error()}")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = torch.cuda.Stream()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output_names = [n for n in names if n not in self.input_names]
        self._buffers: dict[str, torch.Tensor] = {}

    def _torch_dtype(self, name: str) -> torch.dtype:
        import tensorrt as trt
        import torch

        table = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.BF16: torch.bfloat16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.INT8: torch.int8,
            trt.DataType.UINT8: torch.uint8,
            trt.DataType.BOOL: torch.bool,
        }
        dtype = self._engine.get_tensor_dtype(name)
        if dtype not in table:
            raise GraphfuseError(f"tensor {name!r} has type {dtype}, which graphfuse cannot bind")
        return table[dtype]

    def set_inputs(self, feeds: Mapping[str, np.ndarray]) -> None:
        import torch

        missing = sorted(set(self.input_names) - set(feeds))
        extra = sorted(set(feeds) - set(self.input_names))
        if missing or extra:
            raise GraphfuseError(
                f"feeds do not match the engine's inputs: missing {missing}, unexpected {extra}"
            )
        self._buffers.clear()
        for name in self.input_names:
            array = np.ascontiguousarray(feeds[name])
            if array.dtype.name == "bfloat16":  # ml_dtypes arrays: torch cannot wrap them
                array = array.astype(np.float32)
            if not self._context.set_input_shape(name, tuple(array.shape)):
                raise GraphfuseError(
                    f"input {name!r}: shape {_fmt(array.shape)} is outside the engine's profile"
                )
            tensor = torch.from_numpy(array).to(device="cuda", dtype=self._torch_dtype(name))
            self._buffers[name] = tensor
            self._context.set_tensor_address(name, tensor.data_ptr())
        for name in self.output_names:
            shape = _shape(self._context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self._torch_dtype(name), device="cuda")
            self._buffers[name] = tensor
            self._context.set_tensor_address(name, tensor.data_ptr())

    def run_once(self) -> None:
        if not self._context.execute_async_v3(self._stream.cuda_stream):
            raise GraphfuseError("TensorRT could not enqueue the engine (execute_async_v3 failed)")
        self._stream.synchronize()

    def outputs(self) -> dict[str, np.ndarray]:
        import torch

        result = {}
        for name in self.output_names:
            tensor = self._buffers[name]
            if tensor.dtype == torch.bfloat16:
                tensor = tensor.float()
            result[name] = tensor.cpu().numpy()
        return result


def run_engine(engine_path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once on `feeds` and return its outputs."""
    runner = EngineRunner(engine_path)
    runner.set_inputs(feeds)
    runner.run_once()
    return runner.outputs()


def time_engine(
    engine_path: str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 10,
    iters: int = 100,
) -> list[float]:
    """Milliseconds of each of `iters` synchronous runs after `warmup` runs (inputs stay on GPU)."""
    runner = EngineRunner(engine_path)
    runner.set_inputs(feeds)
    for _ in range(warmup):
        runner.run_once()
    times = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        runner.run_once()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


__all__ = [
    "NO_GPU",
    "NO_LIBNVINFER",
    "NO_TENSORRT",
    "BuildResult",
    "EngineRunner",
    "ShapeProfile",
    "TensorRTStatus",
    "build_engine",
    "parse_shapes",
    "probe",
    "run_engine",
    "time_engine",
    "write_atomic",
]
