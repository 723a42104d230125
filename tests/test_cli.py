"""The command line: outputs, and bad input answered with one line, a non-zero exit code, the
input byte-identical and no partial output left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphfuse.models.synthetic import build, reference


def graphfuse(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "graphfuse.cli", *map(str, args)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(build(32, [64] * 5, attention_after={1}).model, path)
    return path


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_inspect_table_and_json(model_file: Path) -> None:
    out = graphfuse("inspect", model_file)
    assert out.returncode == 0, out.stderr
    assert "5 FFN blocks" in out.stdout
    assert "fusable runs: 0-1, 2-4" in out.stdout
    assert "1-2: attention between them" in out.stdout
    data = json.loads(graphfuse("inspect", model_file, "--json").stdout)
    assert data["runs"] == ["0-1", "2-4"]
    assert data["blocks"][3] | {"eps": None} == {
        "index": 3, "residual_add": "block3/residual", "hidden": 32, "intermediate": 64,
        "activation": "silu", "eps": None, "norm": "ReduceMean", "dtype": "float32",
    }  # fmt: skip


def test_fuse_writes_a_checked_model(model_file: Path, tmp_path: Path) -> None:
    out_path = tmp_path / "fused.onnx"
    before = snapshot(tmp_path)
    out = graphfuse("fuse", model_file, "-o", out_path, "--runs", "2-4", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["runs_fused"] == ["2-4"]
    assert report["depth_before"]["ffn_stages"] == 5 and report["depth_after"]["ffn_stages"] == 3
    assert snapshot(tmp_path) | {} == before | {"fused.onnx": out_path.read_bytes()}
    onnx.checker.check_model(str(out_path), full_check=True)
    x = np.random.default_rng(0).standard_normal((1, 3, 32)).astype(np.float32)
    y = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[
        0
    ]
    expected = reference(build(32, [64] * 5, attention_after={1}), x, runs=[(2, 4)])
    assert np.max(np.abs(y - expected)) / np.max(np.abs(expected)) < 1e-5


def _one_line_error(out: subprocess.CompletedProcess, text: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("graphfuse: error: ")
    assert text in lines[0]
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda p, good: p.write_bytes(b"this is not a model"), "not a readable ONNX model"),
        (lambda p, good: p.write_bytes(good.read_bytes()[:2000]), "not a readable ONNX model"),
        (lambda p, good: p.write_bytes(b""), "empty graph"),
    ],
    ids=["not-onnx", "truncated", "empty"],
)
def test_unreadable_input(tmp_path: Path, model_file: Path, make_input, message: str) -> None:
    bad = tmp_path / "bad.onnx"
    make_input(bad, model_file)
    before = snapshot(tmp_path)
    for args in (("inspect", bad), ("fuse", bad, "-o", tmp_path / "out.onnx")):
        _one_line_error(graphfuse(*args), message)
    assert snapshot(tmp_path) == before


def test_missing_external_data(tmp_path: Path) -> None:
    path = tmp_path / "ext.onnx"
    onnx.save(build(32, [64, 64]).model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)  # fmt: skip
    (tmp_path / "ext.onnx.data").unlink()
    before = snapshot(tmp_path)
    _one_line_error(
        graphfuse("fuse", path, "-o", tmp_path / "out.onnx"), "external data file 'ext.onnx.data'"
    )
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("ir", "opset", "message"), [(99, 18, "IR version 99"), (10, 99, "opset 99")]
)
def test_version_the_runtime_cannot_read(tmp_path: Path, ir: int, opset: int, message: str) -> None:
    model = build(32, [64, 64]).model
    model.ir_version = ir
    model.opset_import[0].version = opset
    path = tmp_path / "new.onnx"
    onnx.save(model, path)
    _one_line_error(graphfuse("inspect", path), message)


def test_no_ffn_blocks(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )  # fmt: skip
    path = tmp_path / "relu.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path
    )
    _one_line_error(graphfuse("fuse", path, "-o", tmp_path / "out.onnx"), "no FFN blocks found")
    assert not (tmp_path / "out.onnx").exists()


def test_output_equal_to_input(model_file: Path) -> None:
    before = model_file.read_bytes()
    _one_line_error(graphfuse("fuse", model_file, "-o", model_file), "is the input file")
    assert model_file.read_bytes() == before


def test_unwritable_output_folder(model_file: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root writes through permissions; sysfs is read-only for everyone
        locked = Path("/sys")
    before = snapshot(tmp_path)
    _one_line_error(
        graphfuse("fuse", model_file, "-o", locked / "out.onnx"), "cannot write to output folder"
    )
    assert snapshot(tmp_path) == before


def test_missing_output_folder(model_file: Path, tmp_path: Path) -> None:
    _one_line_error(
        graphfuse("fuse", model_file, "-o", tmp_path / "nope" / "out.onnx"), "does not exist"
    )


def test_runs_that_name_no_run(model_file: Path, tmp_path: Path) -> None:
    before = snapshot(tmp_path)
    _one_line_error(graphfuse("fuse", model_file, "-o", tmp_path / "o.onnx", "--runs", "1-3"),
                    "1-3 is not one run: blocks 1 and 2 cannot be fused")  # fmt: skip
    _one_line_error(
        graphfuse("fuse", model_file, "-o", tmp_path / "o.onnx", "--runs", "7-9"), "names no run"
    )
    assert snapshot(tmp_path) == before


def test_failure_while_writing_leaves_nothing(
    model_file: Path, tmp_path: Path, monkeypatch
) -> None:
    """A failure after fusing, while the output is written, leaves neither file nor temp."""
    import graphfuse.onnx_io as onnx_io
    from graphfuse.api import fuse_file

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx_io.os, "replace", fail)
    before = snapshot(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        fuse_file(model_file, tmp_path / "out.onnx")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder(tmp_path: Path, where: str) -> None:
    """A model file must never pull another file's bytes into an output."""
    secret = tmp_path / "secret.bin"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    path = model_dir / "m.onnx"
    onnx.save(build(32, [64, 64]).model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)  # fmt: skip
    (model_dir / "m.onnx.data").rename(secret)
    proto = onnx.load(str(path), load_external_data=False)
    location = {"parent": "../secret.bin", "absolute": str(secret), "symlink": "link.bin"}[where]
    if where == "symlink":
        (model_dir / "link.bin").symlink_to(secret)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, path)
    before = snapshot(tmp_path)
    out = graphfuse("fuse", path, "-o", tmp_path / "out.onnx")
    _one_line_error(out, "is not a plain file inside")
    assert snapshot(tmp_path) == before
