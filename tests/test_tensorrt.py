"""graphfuse.tensorrt: probe, argument checks, the Polygraphy loader chain, CLI, type check;
engines on a GPU.

Engine tests are marked `gpu` and skipped with probe()'s one-line reason where TensorRT or a
CUDA device is missing. The rest runs everywhere: fake `tensorrt` modules stand in for the ways
TensorRT can be missing, and the loader chain is checked on real (lazy, uncalled) Polygraphy
loaders, which need no TensorRT until called.
"""

from __future__ import annotations

import builtins
import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfuse import tensorrt as gtrt
from graphfuse.errors import GraphfuseError
from graphfuse.tensorrt import (
    ShapeProfile,
    build_engine,
    check_profiles,
    engine_loader,
    parse_shapes,
    probe,
    write_atomic,
)

REPO = Path(__file__).resolve().parents[1]
STATUS = probe()
gpu = pytest.mark.gpu
needs_tensorrt = pytest.mark.skipif(not STATUS.available, reason=STATUS.message)
needs_polygraphy = pytest.mark.skipif(
    importlib.util.find_spec("polygraphy") is None,
    reason="Polygraphy is not installed (pip install -e .[test])",
)


def _matmul_model(path: Path, hidden: int = 16) -> Path:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((hidden, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", hidden])],
        [numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    onnx.save(
        model, path, save_as_external_data=True, location=f"{path.name}.data", size_threshold=0
    )
    return path


def _load_tool(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- availability ------------------------------------------------------------------------------


def test_probe_gives_one_known_line():
    status = probe()
    assert "\n" not in status.message
    if not status.available:
        assert status.message.startswith(
            (gtrt.NO_TENSORRT, gtrt.NO_LIBNVINFER, gtrt.NO_GPU, gtrt.NO_POLYGRAPHY, "TensorRT ")
        )


@pytest.fixture
def no_tensorrt_modules(monkeypatch):
    for name in ("tensorrt", "tensorrt_bindings"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return monkeypatch


def test_probe_and_build_without_tensorrt(no_tensorrt_modules, tmp_path):
    no_tensorrt_modules.setitem(sys.modules, "tensorrt", None)  # import raises ModuleNotFoundError
    no_tensorrt_modules.setitem(sys.modules, "tensorrt_bindings", None)
    status = probe()
    assert not status.available and status.message.startswith("TensorRT is not installed")
    model = _matmul_model(tmp_path / "m.onnx")
    with pytest.raises(GraphfuseError, match="TensorRT is not installed"):
        build_engine(model, tmp_path / "m.plan")
    for run in (gtrt.run_engine, gtrt.bind_engine):  # any existing file: checked before reading
        with pytest.raises(GraphfuseError, match="TensorRT is not installed"):
            run(model, {})


def test_probe_with_type_stubs_only(no_tensorrt_modules):
    # tensorrt-stubs leaves .pyi-only directories that import as empty namespace packages.
    for name in ("tensorrt", "tensorrt_bindings"):
        no_tensorrt_modules.setitem(sys.modules, name, types.ModuleType(name))
    assert probe().message == "TensorRT is not installed (only type stubs are installed)"


def test_probe_with_bindings_but_no_libnvinfer(no_tensorrt_modules):
    no_tensorrt_modules.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))  # stubs only
    real_import = builtins.__import__

    def failing_import(name, *args, **kwargs):
        if name == "tensorrt_bindings":
            raise ImportError("libnvinfer.so.10: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    no_tensorrt_modules.setattr(builtins, "__import__", failing_import)
    status = probe()
    assert status.message == (
        "TensorRT bindings present but libnvinfer missing "
        "(libnvinfer.so.10: cannot open shared object file)"
    )


def _fake_tensorrt(version: str) -> types.ModuleType:
    module = types.ModuleType("tensorrt")

    class ILogger:
        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self):
            pass

    def builder(logger):
        logger.log(ILogger.Severity.ERROR, "CUDA initialization failure with error: 35")
        raise TypeError("pybind11::init(): factory function returned nullptr")

    module.__dict__.update(__version__=version, ILogger=ILogger, Builder=builder)
    return module


def test_probe_without_a_gpu(no_tensorrt_modules, capsys):
    no_tensorrt_modules.setitem(sys.modules, "tensorrt", _fake_tensorrt("10.13.0.35"))
    status = probe()
    assert status.message == "no CUDA device (CUDA initialization failure with error: 35)"
    assert not status.available


def test_probe_refuses_tensorrt_8(no_tensorrt_modules):
    no_tensorrt_modules.setitem(sys.modules, "tensorrt", _fake_tensorrt("8.6.1"))
    assert probe().message == "TensorRT 8.6.1 is too old: graphfuse needs TensorRT 10 or 11"


# -- arguments -------------------------------------------------------------------------------------


def test_parse_shapes_like_trtexec():
    assert parse_shapes("input_ids:1x128, past.0.key:1x3x128x64") == {
        "input_ids": (1, 128),
        "past.0.key": (1, 3, 128, 64),
    }
    assert parse_shapes("x:0:2x3,scalar:") == {"x:0": (2, 3), "scalar": ()}
    for bad, reason in (
        ("x", "expected NAME:DxDxD"),
        ("x:1xq", "integers"),
        ("x:1,x:2", "twice"),
        ("", "no shapes"),
    ):
        with pytest.raises(GraphfuseError, match=reason):
            parse_shapes(bad)


def test_shape_profile_checks_its_bounds():
    ShapeProfile({"x": (1, 4)}, {"x": (8, 4)}, {"x": (32, 4)})
    with pytest.raises(GraphfuseError, match="min <= opt <= max"):
        ShapeProfile({"x": (8, 4)}, {"x": (1, 4)}, {"x": (32, 4)})
    with pytest.raises(GraphfuseError, match="same inputs"):
        ShapeProfile({"x": (1, 4)}, {"y": (1, 4)}, {"x": (1, 4)})


def test_build_refuses_bad_requests_before_touching_tensorrt(tmp_path):
    with pytest.raises(GraphfuseError, match="ONNX file not found"):
        build_engine(tmp_path / "absent.onnx", tmp_path / "m.plan")
    model = _matmul_model(tmp_path / "m.onnx")
    with pytest.raises(GraphfuseError, match="only on weakly typed networks"):
        build_engine(model, tmp_path / "m.plan", fp16=True)
    with pytest.raises(GraphfuseError, match="positive number of MiB"):
        build_engine(model, tmp_path / "m.plan", workspace_mib=0)


@pytest.mark.skipif(STATUS.available, reason="TensorRT is available: nothing to refuse")
def test_build_without_tensorrt_says_what_is_missing(tmp_path):
    model = _matmul_model(tmp_path / "m.onnx")
    with pytest.raises(GraphfuseError) as caught:
        build_engine(model, tmp_path / "m.plan", profiles=[ShapeProfile.static({"x": (1, 16)})])
    assert str(caught.value) == STATUS.message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no engine


def test_dynamic_inputs_need_shapes_and_the_reason_says_which():
    check_profiles({"x": (2, 16)}, [])  # static: nothing to give
    check_profiles({"x": (-1, 16)}, [ShapeProfile.static({"x": (2, 16)})])
    with pytest.raises(GraphfuseError, match=r"dynamic inputs \(x:\?x16\): give their shapes"):
        check_profiles({"x": (-1, 16), "w": (4,)}, [])
    full = ShapeProfile.static({"a": (1, 2), "x": (3,), "y": (1, 5)})
    partial = ShapeProfile.static({"a": (1, 2)})
    with pytest.raises(GraphfuseError, match=r"profile 1: no shape given .* \['x', 'y'\]"):
        check_profiles({"a": (-1, 2), "x": (-1,), "y": (1, -1)}, [full, partial])


def test_write_atomic_leaves_no_temporary_files(tmp_path):
    target = tmp_path / "out" / "engine.plan"
    write_atomic(target, b"old")
    write_atomic(target, memoryview(b"new bytes"))
    assert target.read_bytes() == b"new bytes"
    assert [p.name for p in target.parent.iterdir()] == ["engine.plan"]


# -- the Polygraphy loader chain (composed, never called: no TensorRT needed) -------------------


@needs_polygraphy
def test_loader_chain_on_tensorrt_10(tmp_path):
    from polygraphy.backend.trt import (
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        PostprocessNetwork,
        Profile,
    )

    model = _matmul_model(tmp_path / "m.onnx")
    cache = tmp_path / "timing.cache"
    profile = ShapeProfile(*(parse_shapes(f"x:{n}x16") for n in (1, 4, 8)))
    loader = engine_loader(
        model, tensorrt_version="10.13.0.35", profiles=[profile], timing_cache=cache
    )
    assert isinstance(loader, EngineFromNetwork) and loader.timing_cache_path == str(cache)
    checked = loader._network
    assert isinstance(checked, PostprocessNetwork) and checked.name == "check_shapes"
    parse = checked._network
    assert isinstance(parse, NetworkFromOnnxPath)
    assert parse.path == str(model) and parse.strongly_typed  # the flag exists on 10
    config = loader._config
    assert isinstance(config, CreateConfig)
    (polygraphy_profile,) = config.profiles
    assert list(polygraphy_profile) == ["x"]
    assert tuple(polygraphy_profile["x"]) == ((1, 16), (4, 16), (8, 16))  # min, opt, max
    assert config.tf32 and not config.fp16 and not config.bf16
    assert config.memory_pool_limits is None
    assert config.timing_cache_path is None  # no cache file yet: nothing to load

    cache.write_bytes(b"cache")
    weak = engine_loader(
        model, tensorrt_version="10.13", strongly_typed=False, fp16=True, timing_cache=cache
    )
    assert weak._config.fp16 and not weak._config.bf16 and not weak._network._network.strongly_typed
    assert weak._config.timing_cache_path == str(cache)
    assert weak._config.profiles == [Profile()]  # Polygraphy fills it from a static network


@needs_polygraphy
def test_loader_chain_on_tensorrt_11(tmp_path):
    model = _matmul_model(tmp_path / "m.onnx")
    loader = engine_loader(model, tensorrt_version="11.2.0")
    # Strongly typed always: the deprecated creation flag is not set, and no precision flags.
    assert not loader._network._network.strongly_typed
    assert not loader._config.fp16 and not loader._config.bf16 and loader._config.tf32
    for flag in ("fp16", "bf16"):
        with pytest.raises(
            GraphfuseError, match=rf"TensorRT 11.2.0 has no BuilderFlag\.{flag.upper()}"
        ):
            engine_loader(model, tensorrt_version="11.2.0", strongly_typed=False, **{flag: True})


@needs_polygraphy
def test_composing_the_chain_imports_neither_tensorrt_nor_torch(tmp_path):
    model = _matmul_model(tmp_path / "m.onnx")
    code = (
        "import sys\n"
        "from graphfuse.tensorrt import ShapeProfile, engine_loader\n"
        f"engine_loader({str(model)!r}, tensorrt_version='10.13', "
        "profiles=[ShapeProfile.static({'x': (2, 16)})])\n"
        "print(sorted({'tensorrt', 'tensorrt_bindings', 'torch'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


@needs_polygraphy
def test_polygraphy_failures_become_one_line_reasons(capsys):
    from polygraphy.logger import G_LOGGER

    before = (G_LOGGER.use_python_logging_system, G_LOGGER.colors, G_LOGGER.module_severity.get())
    with pytest.raises(GraphfuseError) as caught, gtrt._polygraphy("building m.onnx"):
        G_LOGGER.info("not shown")
        G_LOGGER.warning("a warning")
        G_LOGGER.error("In node 3 (Foo):\n  UNSUPPORTED_NODE")
        G_LOGGER.critical("Could not parse ONNX correctly")
    assert str(caught.value) == (
        "building m.onnx: In node 3 (Foo): UNSUPPORTED_NODE; "
        "`graphfuse check --target tensorrt` lists what the parser cannot take"
    )
    out, err = capsys.readouterr()
    assert "a warning" in err and "UNSUPPORTED_NODE" in err
    assert "not shown" not in out + err and "Could not parse" not in out + err

    reason = r"^loading e.plan: Could not deserialize engine\.$"  # nothing logged before it
    with pytest.raises(GraphfuseError, match=reason), gtrt._polygraphy("loading e.plan"):
        G_LOGGER.critical("Could not\n deserialize engine.")
    # Polygraphy's logger is left as it was found.
    after = (G_LOGGER.use_python_logging_system, G_LOGGER.colors, G_LOGGER.module_severity.get())
    assert after == before


# -- the CLI --------------------------------------------------------------------------------------


def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys):
    tool = _load_tool("build_engine")
    model = _matmul_model(tmp_path / "m.onnx")
    cases = [
        (
            ["--onnx", str(tmp_path / "absent.onnx"), "--saveEngine", str(tmp_path / "e")],
            "ONNX file not found",
        ),
        (
            ["--onnx", str(model), "--saveEngine", str(tmp_path / "e"), "--shapes", "x:1xq"],
            "bad shape",
        ),
        (
            ["--onnx", str(model), "--saveEngine", str(tmp_path / "e"), "--minShapes", "x:1x16"],
            "go together",
        ),
    ]
    if not STATUS.available:
        cases.append(
            (
                ["--onnx", str(model), "--saveEngine", str(tmp_path / "e"), "--shapes", "x:1x16"],
                STATUS.message,
            )
        )
    for argv, expected in cases:
        assert tool.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("build_engine: error: ") and expected in err


# -- static type check against tensorrt-stubs ------------------------------------------------------

# tensorrt-stubs 10.13.0.35.1 ships .pyi files beside the bindings without a py.typed marker (so
# mypy ignores them as installed) and with a few stubgen syntax errors: copy them, repair those,
# and point mypy at the copy.
_STUB_REPAIRS = [
    (re.compile(r"\bin: list\["), "in_: list["),  # `in` is a keyword
    (re.compile(r"channel_axis: int\)"), "channel_axis: int = ...)"),  # non-default after default
]
_CANARY = """\
def canary() -> None:
    import tensorrt as trt

    config = trt.Builder(trt.Logger()).create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE)
"""


def _stub_files() -> list[Path]:
    try:
        files = importlib.metadata.files("tensorrt-stubs") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    return [Path(str(f.locate())) for f in files if str(f).endswith(".pyi")]


def test_tensorrt_module_type_checks_against_tensorrt_stubs(tmp_path):
    stubs = _stub_files()
    if not stubs:
        pytest.skip("tensorrt-stubs is not installed (pip install --no-deps tensorrt-stubs)")
    pytest.importorskip("mypy")
    root = tmp_path / "stubs"
    for stub in stubs:
        package = stub.parent.name
        (root / package).mkdir(parents=True, exist_ok=True)
        text = stub.read_text()
        for pattern, replacement in _STUB_REPAIRS:
            text = pattern.sub(replacement, text)
        (root / package / stub.name).write_text(text)
    canary = tmp_path / "canary.py"
    canary.write_text(_CANARY)
    config = tmp_path / "mypy.ini"
    config.write_text(
        "[mypy]\npython_version = 3.11\nignore_missing_imports = True\nfollow_imports = silent\n"
        f"mypy_path = {root}\n[mypy-tensorrt.*]\nignore_errors = True\n"
        "[mypy-tensorrt_bindings.*]\nignore_errors = True\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(config),
         "--cache-dir", str(tmp_path / "cache"), "graphfuse/tensorrt.py", str(canary)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = result.stdout.splitlines()
    ours = [line for line in lines if line.startswith("graphfuse/")]
    assert ours == [], "\n".join(ours)
    # The canary proves the stubs were really used: a wrong TensorRT call is caught.
    assert any('Missing positional argument "pool_size"' in line for line in lines), result.stdout


# -- engines (GPU) ---------------------------------------------------------------------------------


@gpu
@needs_tensorrt
def test_build_run_and_time_an_engine(tmp_path):
    model = _matmul_model(tmp_path / "m.onnx")  # weights in external data
    profile = ShapeProfile({"x": (1, 16)}, {"x": (4, 16)}, {"x": (8, 16)})
    result = build_engine(
        model,
        tmp_path / "m.plan",
        profiles=[profile],
        workspace_mib=256,
        timing_cache=tmp_path / "timing.cache",
        layer_info=tmp_path / "layers.json",
    )
    assert result.strongly_typed and result.engine_path.stat().st_size > 0
    assert result.input_shapes == {"x": (-1, 16)}
    assert (tmp_path / "timing.cache").stat().st_size > 0
    assert json.loads((tmp_path / "layers.json").read_text())

    x = np.random.default_rng(1).standard_normal((4, 16)).astype(np.float32)
    weight = numpy_helper.to_array(onnx.load(str(model)).graph.initializer[0])
    (y,) = gtrt.run_engine(result.engine_path, {"x": x}).values()
    np.testing.assert_allclose(y, np.maximum(x @ weight, 0), rtol=1e-2, atol=1e-2)  # TF32 allowed

    times = gtrt.time_engine(result.engine_path, {"x": x}, warmup=3, iters=20)
    assert len(times) == 20 and min(times) > 0

    # A second build reuses the timing cache written by the first.
    build_engine(
        model, tmp_path / "again.plan", profiles=[profile], timing_cache=tmp_path / "timing.cache"
    )


@gpu
@needs_tensorrt
def test_dynamic_inputs_need_shapes(tmp_path):
    with pytest.raises(GraphfuseError, match="dynamic inputs"):
        build_engine(_matmul_model(tmp_path / "m.onnx"), tmp_path / "m.plan")


@gpu
@needs_tensorrt
def test_precision_flags_follow_the_tensorrt_version(tmp_path):
    model = _matmul_model(tmp_path / "m.onnx")
    profile = [ShapeProfile.static({"x": (2, 16)})]
    if int(str(STATUS.version).split(".")[0]) >= 11:
        with pytest.raises(GraphfuseError, match=r"no BuilderFlag\.FP16"):
            build_engine(
                model, tmp_path / "m.plan", profiles=profile, strongly_typed=False, fp16=True
            )
    else:
        result = build_engine(
            model, tmp_path / "m.plan", profiles=profile, strongly_typed=False, fp16=True
        )
        assert not result.strongly_typed
