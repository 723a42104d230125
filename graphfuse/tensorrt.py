"""Build, run and time TensorRT engines from ONNX files on Polygraphy's loaders.

    engine_loader(onnx, ...)
      EngineFromNetwork(save_timing_cache)               build; merge the timing cache back
      |-- PostprocessNetwork(check_shapes)               graphfuse: shapes for dynamic inputs
      |   `-- NetworkFromOnnxPath(onnx, strongly_typed)  parse_from_file: external data beside
      `-- CreateConfig(profiles=[Profile().add(input, min, opt, max)], tf32, fp16/bf16,
                       memory_pool_limits={WORKSPACE: MiB}, load_timing_cache)
    build_engine   SaveEngine(engine_loader(...), temporary file) --rename--> engine file
                   engine --IEngineInspector--> layer information (JSON)
    run_engine     TrtRunner(EngineFromPath(engine file)).infer(feeds)
    bind_engine    EngineFromPath, torch.cuda buffers bound once: a run is enqueue + sync
                   (time_engine, and graphfuse.latency's "trt" backend)

Polygraphy imports TensorRT lazily, so this module imports where TensorRT is absent. graphfuse
keeps: `probe()`, one line naming what is missing; the refusal of a dynamic input without shapes
(Polygraphy would build for 1s); atomic writes; each Polygraphy failure as a one-line
GraphfuseError; and TensorRT 10 vs 11. Networks are always strongly typed in 11, where the
STRONGLY_TYPED flag is deprecated and ignored, so it is set on 10 only. BuilderFlag.FP16/BF16
exist only in 10 and act only on weakly typed networks; on 11 precision comes from the ONNX
tensor types (`graphfuse.convert` first). TF32 stays allowed, TensorRT's and trtexec's default
(Polygraphy would clear it). The inspector's JSON ("Bindings" in 10, "I/O Tensors" in 11) is
written verbatim.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import EngineFromNetwork, Profile

Shape = tuple[int, ...]

NO_TENSORRT = "TensorRT is not installed"
NO_LIBNVINFER = "TensorRT bindings present but libnvinfer missing"
NO_GPU = "no CUDA device"
NO_POLYGRAPHY = "Polygraphy is not installed"


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
    stubs = False
    for name in ("tensorrt", "tensorrt_bindings"):
        try:
            module = __import__(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue
            raise _Unavailable(f"{NO_LIBNVINFER} ({exc})") from exc
        except (ImportError, OSError) as exc:
            raise _Unavailable(f"{NO_LIBNVINFER} ({exc})") from exc
        if hasattr(module, "Builder"):
            # Bindings without the `tensorrt` wrapper (system libnvinfer + bindings wheel):
            # register them under the name graphfuse and Polygraphy import, as the wrapper would.
            sys.modules["tensorrt"] = module
            break
        stubs = True  # type stubs alone: a namespace package
    else:
        if stubs:
            raise _Unavailable(f"{NO_TENSORRT} (only type stubs are installed)")
        raise _Unavailable(
            f"{NO_TENSORRT} (install TensorRT 10 or 11 with its libraries on a machine with an "
            "NVIDIA GPU)"
        )
    version = str(getattr(module, "__version__", "0"))
    if _major_minor(version)[0] < 10:
        raise _Unavailable(f"TensorRT {version} is too old: graphfuse needs TensorRT 10 or 11")
    return version


def _major_minor(version: str) -> tuple[int, int]:
    parts = [int(p) if p.isdigit() else 0 for p in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def _start_builder() -> None:
    """Create and drop a trt.Builder, the step that fails without a usable GPU."""
    import tensorrt as trt

    errors: list[str] = []

    # Not Polygraphy's TensorRT logger: its lazy `tensorrt` binds to the first module it sees,
    # while the probe must judge whatever `import tensorrt` gives now.
    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                errors.append(msg)

    try:
        builder = trt.Builder(Logger())
    except Exception as exc:  # without a GPU pybind raises "... factory function returned nullptr"
        raise _Unavailable(f"{NO_GPU} ({'; '.join(errors) or exc})") from exc
    if builder is None:  # defensive: older bindings returned None instead of raising
        raise _Unavailable(f"{NO_GPU} ({'; '.join(errors) or 'trt.Builder failed'})")


def probe() -> TensorRTStatus:
    """Say whether TensorRT engines can be built here and, if not, the one thing missing."""
    try:
        version = _load_tensorrt()
        _start_builder()
        if importlib.util.find_spec("polygraphy") is None:
            raise _Unavailable(f"{NO_POLYGRAPHY} (pip install 'polygraphy>=0.49')")
    except _Unavailable as exc:
        return TensorRTStatus(False, str(exc))
    return TensorRTStatus(True, f"TensorRT {version} with a CUDA device", version)


def _require() -> str:
    """TensorRT's version, or GraphfuseError with probe()'s one-line reason."""
    status = probe()
    if not status.available:
        raise GraphfuseError(status.message)
    return str(status.version)


@contextlib.contextmanager
def _polygraphy(failure: str, verbose: bool = False) -> Iterator[None]:
    """Run Polygraphy; a PolygraphyException becomes GraphfuseError(f"{failure}: {reason}").

    Meanwhile Polygraphy's log (TensorRT's passes through it) goes through Python's logging to
    stderr (warnings and errors, or everything if `verbose`); the reason is the first error
    logged (the parser's or builder's complaint), else the exception's message.
    """
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    errors: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.levelno >= logging.ERROR:
                errors.append(" ".join(re.sub(r"^\[.\] ", "", text).split()))
            if record.levelno < logging.CRITICAL:  # the critical message is raised instead
                print(text, file=sys.stderr)

    logger, sink = logging.getLogger("Polygraphy"), Sink()
    saved = (G_LOGGER.use_python_logging_system, G_LOGGER.colors, logger.level, logger.propagate)
    G_LOGGER.use_python_logging_system, G_LOGGER.colors, logger.propagate = True, False, False
    logger.setLevel(1)
    logger.addHandler(sink)
    try:
        with G_LOGGER.verbosity(G_LOGGER.EXTRA_VERBOSE if verbose else G_LOGGER.WARNING):
            yield
    except PolygraphyException as exc:
        reason = errors[0] if errors else " ".join(str(exc).split())
        if "parse ONNX" in str(exc):  # Polygraphy's words when TensorRT's parser gives up
            reason += "; `graphfuse check --target tensorrt` lists what the parser cannot take"
        raise GraphfuseError(f"{failure}: {reason}") from None
    finally:
        logger.removeHandler(sink)
        G_LOGGER.use_python_logging_system, G_LOGGER.colors, level, logger.propagate = saved
        logger.setLevel(level)


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

    def to_polygraphy(self) -> Profile:
        from polygraphy.backend.trt import Profile

        profile = Profile()
        for name in self.min:
            profile.add(name, min=self.min[name], opt=self.opt[name], max=self.max[name])
        return profile


def check_profiles(inputs: Mapping[str, Shape], profiles: Sequence[ShapeProfile]) -> None:
    """Refuse profiles that leave a dynamic input (a -1 in `inputs`) without shapes.

    Polygraphy would fill such an input with 1s; what it and TensorRT refuse themselves (a name
    that is no input, a shape that does not fit) reaches the one-line reason from there.
    """
    dynamic = [name for name, shape in inputs.items() if any(d < 0 for d in shape)]
    if dynamic and not profiles:
        listed = ", ".join(f"{name}:{_fmt(inputs[name])}" for name in dynamic)
        raise GraphfuseError(
            f"the model has dynamic inputs ({listed}): give their shapes "
            "(--shapes, or --minShapes/--optShapes/--maxShapes)"
        )
    for index, profile in enumerate(profiles):
        missing = [name for name in dynamic if name not in profile.min]
        if missing:
            raise GraphfuseError(f"profile {index}: no shape given for dynamic inputs {missing}")


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    engine_path: Path
    build_seconds: float  # the whole chain: parse, build, save
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


def engine_loader(
    onnx_path: str | Path,
    *,
    tensorrt_version: str,
    profiles: Sequence[ShapeProfile] = (),
    workspace_mib: int | None = None,
    timing_cache: str | Path | None = None,
    strongly_typed: bool = True,
    fp16: bool = False,
    bf16: bool = False,
) -> EngineFromNetwork:
    """Polygraphy's chain from `onnx_path` to an engine (the picture above), not yet called.

    Composing it needs no TensorRT (but `workspace_mib` names trt.MemoryPoolType.WORKSPACE);
    calling it needs TensorRT and a GPU. The timing cache is read if the file exists and merged
    back after the build under Polygraphy's lock file. Arguments as for `build_engine`.
    """
    from polygraphy.backend import trt as poly

    major, _ = _major_minor(tensorrt_version)
    for wanted, flag in ((fp16, "FP16"), (bf16, "BF16")):
        if wanted and major >= 11:
            raise GraphfuseError(
                f"TensorRT {tensorrt_version} has no BuilderFlag.{flag}: precision comes from the "
                "ONNX tensor types; convert the model with graphfuse.convert first"
            )
    limits = None
    if workspace_mib is not None:
        import tensorrt as trt

        limits = {trt.MemoryPoolType.WORKSPACE: workspace_mib << 20}
    cache = str(timing_cache) if timing_cache is not None else None

    def check_shapes(network: trt.INetworkDefinition) -> None:
        tensors = (network.get_input(i) for i in range(network.num_inputs))
        check_profiles({tensor.name: _shape(tensor.shape) for tensor in tensors}, profiles)

    # TensorRT 11 networks are always strongly typed; there the flag is deprecated and ignored.
    parse = poly.NetworkFromOnnxPath(str(onnx_path), strongly_typed=strongly_typed and major < 11)
    config = poly.CreateConfig(
        profiles=[profile.to_polygraphy() for profile in profiles] or None,
        tf32=True,
        fp16=fp16,
        bf16=bf16,
        memory_pool_limits=limits,
        load_timing_cache=cache if cache is not None and Path(cache).is_file() else None,
    )
    network = poly.PostprocessNetwork(parse, check_shapes)
    return poly.EngineFromNetwork(network, config=config, save_timing_cache=cache)


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
    - `timing_cache`: read if the file exists, then updated with this build's timings.
    - `layer_info`: write the engine inspector's layer information (JSON) there.
    - `strongly_typed`: precision follows the ONNX tensor types (always so on TensorRT 11).
    - `fp16` / `bf16`: TensorRT 10 builder flags for weakly typed networks only.
    - `verbose`: print TensorRT's and Polygraphy's whole log (else warnings and errors).
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

    version = _require()
    import tensorrt as trt
    from polygraphy.backend.trt import SaveEngine

    cache_path = Path(timing_cache) if timing_cache is not None else None
    info_path = Path(layer_info) if layer_info is not None else None
    with _polygraphy(f"TensorRT could not build an engine from {onnx_path.name}", verbose):
        loader = engine_loader(
            onnx_path,
            tensorrt_version=version,
            profiles=profiles,
            workspace_mib=workspace_mib,
            timing_cache=cache_path,
            strongly_typed=strongly_typed,
            fp16=fp16,
            bf16=bf16,
        )
        start = time.perf_counter()
        with _atomic_writer(engine_path) as handle:
            engine: trt.ICudaEngine = SaveEngine(loader, handle)()
        seconds = time.perf_counter() - start

    if info_path is not None:
        inspector = engine.create_engine_inspector()
        write_atomic(info_path, inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    return BuildResult(
        engine_path=engine_path,
        build_seconds=seconds,
        tensorrt_version=version,
        strongly_typed=_major_minor(version)[0] >= 11 or strongly_typed,
        input_shapes={name: _shape(engine.get_tensor_shape(name)) for name in inputs},
        timing_cache=cache_path,
        layer_info=info_path,
    )


# ----------------------------------------------------------------------------------------------
# Running and timing
# ----------------------------------------------------------------------------------------------


def _check_feeds(expected: Iterable[str], feeds: Mapping[str, np.ndarray]) -> None:
    missing, extra = sorted(set(expected) - set(feeds)), sorted(set(feeds) - set(expected))
    if missing or extra:
        raise GraphfuseError(
            f"feeds do not match the engine's inputs: missing {missing}, unexpected {extra}"
        )


def _to_torch(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    import torch

    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes arrays: torch cannot wrap them
        array = array.astype(np.float32)
    return torch.from_numpy(array).to(dtype)


def run_engine(engine_path: str | Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an engine once on `feeds` with Polygraphy's TrtRunner and return its outputs.

    Feeds go in as torch tensors of the engine's input types, so bf16 works both ways.
    """
    path = Path(engine_path)
    if not path.is_file():
        raise GraphfuseError(f"engine file not found: {path}")
    _require()
    import torch
    from polygraphy.backend.trt import EngineFromPath, TrtRunner
    from polygraphy.datatype import DataType

    runner = TrtRunner(EngineFromPath(str(path)))
    with _polygraphy(f"TensorRT could not run {path.name}"), runner:
        metadata = runner.get_input_metadata(use_numpy_dtypes=False)
        _check_feeds(metadata.keys(), feeds)
        inputs = {
            name: _to_torch(feeds[name], DataType.to_dtype(meta.dtype, "torch"))
            for name, meta in metadata.items()
        }
        outputs = runner.infer(inputs)
    # numpy has no bfloat16: such outputs come back as float32
    return {
        name: (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy()
        for name, value in outputs.items()
    }


def bind_engine(engine_path: str | Path, feeds: Mapping[str, np.ndarray]) -> Callable[[], None]:
    """Bind `feeds` to an engine once; each call of the result runs it: enqueue + sync only.

    Not TrtRunner: its infer() does host work per I/O tensor on every call (shape and address
    checks, a Python IOutputAllocator callback per output) that a decode step with dozens of
    KV-cache tensors would add to each timed run, pulling A/B ratios towards 1. Here torch.cuda
    buffers are bound once; Polygraphy still loads the engine and maps the data types.
    """
    path = Path(engine_path)
    if not path.is_file():
        raise GraphfuseError(f"engine file not found: {path}")
    _require()
    import tensorrt as trt
    import torch
    from polygraphy.backend.trt import EngineFromPath
    from polygraphy.datatype import DataType

    if not torch.cuda.is_available():
        raise GraphfuseError(f"{NO_GPU}: torch.cuda cannot hold the engine's buffers")
    with _polygraphy(f"TensorRT could not load {path.name}"):
        engine: trt.ICudaEngine = EngineFromPath(str(path))()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        dtypes = {
            name: DataType.to_dtype(
                DataType.from_dtype(engine.get_tensor_dtype(name), source_module="tensorrt"),
                "torch",
            )
            for name in names
        }
    inputs = [name for name in names if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT]
    _check_feeds(inputs, feeds)
    context = engine.create_execution_context()
    buffers: dict[str, torch.Tensor] = {}
    for name in inputs:
        buffers[name] = _to_torch(feeds[name], dtypes[name]).cuda()
        if not context.set_input_shape(name, tuple(buffers[name].shape)):
            raise GraphfuseError(
                f"input {name!r}: shape {_fmt(buffers[name].shape)} is outside the engine's profile"
            )
    for name in names:
        if name not in buffers:  # an output: its shape is known once the inputs' are set
            shape = _shape(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=dtypes[name], device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()  # the copies ran on torch's stream, the engine runs on its own

    def run() -> None:
        _ = engine, buffers  # alive as long as the runner
        if not context.execute_async_v3(stream.cuda_stream):
            raise GraphfuseError("TensorRT could not enqueue the engine (execute_async_v3 failed)")
        stream.synchronize()

    return run


def time_engine(
    engine_path: str | Path,
    feeds: Mapping[str, np.ndarray],
    *,
    warmup: int = 10,
    iters: int = 100,
) -> list[float]:
    """Milliseconds of each of `iters` synchronous runs after `warmup` runs (inputs stay on GPU)."""
    run = bind_engine(engine_path, feeds)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter_ns()
        run()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times
