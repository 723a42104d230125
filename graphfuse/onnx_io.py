"""Reading models safely and writing them atomically, with weights streamed from disk to disk.

A model is read without its external data; weights are read one tensor at a time when a pass
needs them. On writing, every external tensor is copied chunk by chunk into one data file beside
the output (never pointing back into the input's data file), new tensors are appended as they
are made, and the files only take their final names once everything is written: a failure
leaves no half-written output. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper, numpy_helper

from graphfuse.errors import GraphfuseError

# Protobuf cannot serialise a message over 2 GB; leave room for the graph itself.
INLINE_LIMIT = 1 << 30
ALIGN = 4096
COPY_CHUNK = 64 << 20


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX file (not its external data) and check that it can be worked on here."""
    path = Path(path)
    if not path.is_file():
        raise GraphfuseError(f"{path}: no such file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, OSError) as e:
        raise GraphfuseError(
            f"{path}: not a readable ONNX model ({type(e).__name__}); is the file complete?"
        ) from None
    if not model.HasField("graph") or not model.graph.node:
        raise GraphfuseError(f"{path}: not an ONNX model, or one with an empty graph")
    check_external_data(model, path.parent)
    check_runtime_can_read(model, path)
    return model


def check_external_data(model: onnx.ModelProto, base_dir: Path) -> None:
    for tensor in model.graph.initializer:
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        file = base_dir / info.location
        inside = base_dir.resolve() in (base_dir / info.location).resolve().parents
        if Path(info.location).is_absolute() or not inside or file.is_symlink():
            raise GraphfuseError(
                f"external data location '{info.location}' of tensor '{tensor.name}' is not a "
                f"plain file inside {base_dir}: a model may only read data beside it; move the "
                "data file next to the model and fix the location"
            )
        if not file.is_file():
            raise GraphfuseError(
                f"external data file '{info.location}' of tensor '{tensor.name}' is missing; "
                f"put it beside the model in {base_dir}"
            )
        end = (info.offset or 0) + (info.length or 0)
        if file.stat().st_size < end:
            raise GraphfuseError(
                f"external data file '{info.location}' is shorter than tensor '{tensor.name}' "
                "needs: the file is truncated"
            )


def check_runtime_can_read(model: onnx.ModelProto, path: Path | str = "model") -> None:
    """Fail early, with the fix, when the installed ONNX Runtime cannot read this model."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=1)
    if not _runtime_reads(model.ir_version, 13):
        raise GraphfuseError(
            f"{path}: IR version {model.ir_version} is newer than the installed onnxruntime reads; "
            "re-export with a lower ir_version or upgrade onnxruntime"
        )
    if not _runtime_reads(min(model.ir_version, 8), opset):
        raise GraphfuseError(
            f"{path}: opset {opset} is newer than the installed onnxruntime supports; "
            "re-export with a lower opset or upgrade onnxruntime"
        )


@functools.cache
def _runtime_reads(ir_version: int, opset: int) -> bool:
    """Ask ONNX Runtime itself: does it load an Identity model of this IR version and opset?"""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    probe.ir_version = ir_version
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the probe's failures are answers, not news
    try:
        ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception:
        return False
    return True


def validation_error(path: Path) -> str | None:
    """Why the ONNX checker (full check, with shape inference) rejects a model file, or None."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return str(e).strip().splitlines()[0]
    return None


def model_base_dir(path: str | os.PathLike | None) -> Path | None:
    return None if path is None else Path(path).resolve().parent


def check_output_path(output: str | os.PathLike, inputs: list[Path]) -> Path:
    """Refuse an output that would overwrite an input or that cannot be written."""
    out = Path(output).resolve()
    for existing in inputs:
        if out == existing.resolve():
            raise GraphfuseError(f"output {output} is the input file; choose another path")
    data = out.with_name(out.name + ".data")
    for existing in inputs:
        if data == existing.resolve():
            raise GraphfuseError(f"output data file {data} is an input file; choose another path")
    if not out.parent.is_dir():
        raise GraphfuseError(f"output folder {out.parent} does not exist")
    try:  # ask the file system itself: permissions, read-only mounts, root or not
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as e:
        raise GraphfuseError(f"cannot write to output folder {out.parent} ({e.strerror})") from None
    return out


def external_files(model: onnx.ModelProto, base_dir: Path | None) -> list[Path]:
    if base_dir is None:
        return []
    return sorted(
        {
            base_dir / external_data_helper.ExternalDataInfo(t).location
            for t in model.graph.initializer
            if external_data_helper.uses_external_data(t)
        }
    )


class TensorSink:
    """Where new weights go: kept in the proto (`None` path) or appended to an output data file
    as they are made, so that no more than one run's weights are ever in memory."""

    def __init__(self, data_path: Path | None = None) -> None:
        self.data_path = data_path
        self.written: set[str] = set()  # tensors already in the data file
        self._file = None
        self._tmp: Path | None = None
        if data_path is not None:
            fd, tmp = tempfile.mkstemp(
                prefix=data_path.name + ".", suffix=".partial", dir=data_path.parent
            )
            self._file = os.fdopen(fd, "wb")
            self._tmp = Path(tmp)

    def tensor(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        if self._file is None:
            return numpy_helper.from_array(np.ascontiguousarray(array), name)
        tensor = onnx.TensorProto(name=name, dims=array.shape)
        tensor.data_type = onnx.helper.np_dtype_to_tensor_dtype(array.dtype)
        self._append(tensor, np.ascontiguousarray(array).view(np.uint8).reshape(-1).data)
        self.written.add(name)
        return tensor

    def copy(self, tensor: onnx.TensorProto, base_dir: Path | None) -> None:
        """Move one tensor of the input into the output's data file (streamed from disk)."""
        assert self._file is not None
        if external_data_helper.uses_external_data(tensor):
            info = external_data_helper.ExternalDataInfo(tensor)
            with open(Path(base_dir or ".") / info.location, "rb") as src:
                src.seek(info.offset or 0)
                offset = self._start(tensor)
                remaining = (
                    info.length if info.length is not None else os.fstat(src.fileno()).st_size
                )
                while remaining > 0:
                    chunk = src.read(min(COPY_CHUNK, remaining))
                    if not chunk:
                        raise GraphfuseError(f"external data of '{tensor.name}' is truncated")
                    self._file.write(chunk)
                    remaining -= len(chunk)
                self._finish(tensor, offset)
        elif tensor.HasField("raw_data") and len(tensor.raw_data) >= 1024:
            raw = tensor.raw_data
            tensor.ClearField("raw_data")
            self._append(tensor, raw)

    def _start(self, tensor: onnx.TensorProto) -> int:
        assert self._file is not None
        offset = self._file.tell()
        pad = -offset % ALIGN
        self._file.write(b"\0" * pad)
        return offset + pad

    def _finish(self, tensor: onnx.TensorProto, offset: int) -> None:
        assert self._file is not None and self.data_path is not None
        length = self._file.tell() - offset
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (
            ("location", self.data_path.name),
            ("offset", offset),
            ("length", length),
        ):
            tensor.external_data.add(key=key, value=str(value))

    def _append(self, tensor: onnx.TensorProto, data) -> None:
        offset = self._start(tensor)
        self._file.write(data)  # type: ignore[union-attr]
        self._finish(tensor, offset)

    def commit(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            os.replace(self._tmp, self.data_path)  # type: ignore[arg-type]
            self._file = None

    def discard(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tmp is not None:
            with suppress(FileNotFoundError):
                self._tmp.unlink()


def needs_external_data(model: onnx.ModelProto) -> bool:
    inline = sum(len(t.raw_data) for t in model.graph.initializer)
    return inline > INLINE_LIMIT or any(
        external_data_helper.uses_external_data(t) for t in model.graph.initializer
    )


@contextmanager
def atomic_folder(output: Path, inputs: list[Path]):
    """Yield an empty temporary folder beside ``output``; it becomes ``output`` only if the block
    succeeds. ``output`` must be new (or an empty folder) and none of ``inputs``."""
    for existing in inputs:
        if output.resolve() == existing.resolve():
            raise GraphfuseError(f"output folder {output} is an input; choose another path")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise GraphfuseError(f"output {output} already exists; choose a new folder")
    if not output.parent.is_dir():
        raise GraphfuseError(f"output folder {output.parent} does not exist")
    try:
        tmp = Path(
            tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent)
        )
    except OSError as e:
        raise GraphfuseError(f"cannot write to {output.parent} ({e.strerror})") from None
    try:
        yield tmp
        _readable(tmp)
        if output.exists():
            output.rmdir()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _readable(folder: Path) -> None:
    """Give a folder made by mkdtemp (0700) and its files the modes the umask would have."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for item in folder.rglob("*"):
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


@contextmanager
def atomic_output(path: Path):
    """Yield a temporary path beside ``path``; it becomes ``path`` only if the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".partial", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def save(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    *,
    base_dir: Path | None = None,
    sink: TensorSink | None = None,
) -> Path:
    """Write ``model`` to ``path`` atomically. Models with external data (or too big to inline)
    get one data file, ``<name>.data``, beside the output; ``sink`` is the one already holding
    the tensors a pass wrote there."""
    path = Path(path).resolve()
    external = (sink is not None and sink.data_path is not None) or needs_external_data(model)
    if external and sink is None:
        sink = TensorSink(path.with_name(path.name + ".data"))
    try:
        if external:
            assert sink is not None
            for tensor in model.graph.initializer:
                if tensor.name not in sink.written:
                    sink.copy(tensor, base_dir)
        with atomic_output(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
                f.flush()
                os.fsync(f.fileno())
            if sink is not None:
                sink.commit()
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    return path
