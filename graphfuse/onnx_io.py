"""Reading models safely and writing them atomically, with weights streamed from disk to disk.

A model is read without its external data, and its data files are checked before a byte is read:
a location must name a plain file beside the model (onnx_ir, which reads external data by its own
code, checks containment too; the checks here give the user's error). Weights are read one
tensor at a time when a pass needs them. On writing (`graphfuse.ir.save`, onnx_ir's writer),
every external tensor goes into one data file beside the output, never pointing back into the
input's, and the files only take their final names once everything is written: a failure leaves
no half-written output. Inputs are only ever opened for reading.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from graphfuse.errors import GraphfuseError


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
    model: onnx.ModelProto | ir.Model, path: str | os.PathLike, *, base_dir: Path | None = None
) -> Path:
    """Write ``model`` to ``path`` atomically: the model file and, where it needs one, its data
    file ``<name>.data`` are written in a folder beside ``path`` and moved into place once both
    are complete. ``base_dir`` is where a proto's external data lives."""
    from graphfuse import ir as irs

    path = Path(path).resolve()
    if isinstance(model, onnx.ModelProto):
        model = irs.from_proto(model, base_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    except OSError as e:
        raise GraphfuseError(f"cannot write to {path.parent} ({e.strerror})") from None
    data = path.with_name(path.name + ".data")
    kept = tmp / "previous.data"  # an earlier output's data, put back if this one fails
    moved = False
    try:
        irs.save(model, tmp / path.name)
        if (tmp / data.name).exists():
            if data.exists():
                os.replace(data, kept)
            os.replace(tmp / data.name, data)
            moved = True
        os.replace(tmp / path.name, path)
    except BaseException:
        if kept.exists():
            os.replace(kept, data)
        elif moved:
            data.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path
