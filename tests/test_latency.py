"""graphfuse.latency on ONNX Runtime CPU: feeds, the A/B method, the provider guard, bandwidth.

Timing runs are kept tiny (a few dozen pairs of sub-millisecond models): these tests check the
harness, not the speed of this shared machine.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphfuse import latency
from graphfuse.errors import GraphfuseError
from graphfuse.latency import (
    SCENARIOS,
    Bandwidth,
    compare_latency,
    create_session,
    format_table,
    make_feeds,
    measure_bandwidth,
    time_pairs,
    weight_bytes,
)

H = 64
VOCAB = 50
KV_HEADS, HEAD_DIM = 2, 8
FAKE_BANDWIDTH = Bandwidth(read_gbps=10.0, copy_gbps=20.0, buffer_mib=64, threads=1)


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _matmul_chain(path, k, seed=0):
    rng = np.random.default_rng(seed)
    nodes, inits, current = [], [], "x"
    for i in range(k):
        inits.append(
            numpy_helper.from_array(
                (rng.standard_normal((H, H)) * 0.05).astype(np.float32), f"w{i}"
            )
        )
        nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [f"h{i}"]))
        current = f"h{i}"
    nodes.append(helper.make_node("Identity", [current], ["y"]))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", H])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
    )
    return _save(graph, path)


def _decoder_like(path, layers_with_attention):
    """input_ids -> embedding, plus a reduction of each past.{i}.key/value present."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, H)).astype(np.float32), "embed"),
        numpy_helper.from_array(np.array([1, 2, 3], np.int64), "kv_axes"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "unsq_axes"),
    ]
    nodes = [helper.make_node("Gather", ["embed", "input_ids"], ["h"])]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_len"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
    ]
    current = "h"
    for i in layers_with_attention:
        for kind in ("key", "value"):
            name = f"past.{i}.{kind}"
            inputs.append(
                helper.make_tensor_value_info(
                    name, TensorProto.FLOAT, ["batch", KV_HEADS, "past_len", HEAD_DIM]
                )
            )
            nodes += [
                helper.make_node("ReduceSum", [name, "kv_axes"], [f"{name}/sum"], keepdims=0),
                helper.make_node("Unsqueeze", [f"{name}/sum", "unsq_axes"], [f"{name}/col"]),
                helper.make_node("Add", [current, f"{name}/col"], [f"{name}/out"]),
            ]
            current = f"{name}/out"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "decoder",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", H])],
        inits,
    )
    return _save(graph, path)


def test_two_tiny_models_give_a_finite_ratio_table_json_and_png(tmp_path):
    a = _matmul_chain(tmp_path / "a.onnx", 3)
    b = _matmul_chain(tmp_path / "b.onnx", 3, seed=1)
    report = compare_latency(
        a,
        b,
        scenarios=["decode-128", "prefill-128"],
        pairs=20,
        warmup=2,
        bandwidth=FAKE_BANDWIDTH,
        labels=("original", "fused"),
    )
    assert [r.scenario for r in report.results] == ["decode-128", "prefill-128"]
    for result in report.results:
        assert math.isfinite(result.ratio_median) and result.ratio_median > 0
        assert result.a.runs == result.b.runs == 20
        assert result.a.p90_ms >= result.a.median_ms > 0
    decode, prefill = report.results
    assert decode.roofline_a_ms == pytest.approx(weight_bytes(a) / 10e9 * 1e3)
    assert prefill.roofline_a_ms is None  # the roofline is reported for decode steps only

    table = format_table(report)
    assert "decode-128" in table and "prefill-128" in table and "original med" in table
    data = json.loads(report.to_json(tmp_path / "report.json"))
    assert data["results"][0]["scenario"] == "decode-128"
    assert data["results"][0]["roofline_fraction_a"] == pytest.approx(decode.roofline_fraction_a)
    assert data["bandwidth"]["read_gbps"] == 10.0

    pytest.importorskip("matplotlib")
    png = latency.plot_report(report, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_returns_a_plain_dict_and_writes_files(tmp_path):
    pytest.importorskip("matplotlib")
    a = _matmul_chain(tmp_path / "a.onnx", 2)
    result = latency.compare(
        a, a, scenarios=["decode-128"], pairs=5, warmup=1, bandwidth=False,
        png=tmp_path / "c.png", json_path=tmp_path / "c.json",
    )  # fmt: skip
    assert result["results"][0]["scenario"] == "decode-128"
    assert json.loads((tmp_path / "c.json").read_text()) == json.loads(json.dumps(result))
    assert (tmp_path / "c.png").stat().st_size > 0


def test_feeds_follow_each_models_inputs_even_with_fewer_past_inputs(tmp_path):
    full = _decoder_like(tmp_path / "full.onnx", [0, 1, 2])
    pruned = _decoder_like(tmp_path / "pruned.onnx", [0, 2])  # attention removed in layer 1
    decode = make_feeds(full, SCENARIOS["decode-1024"])
    assert decode["input_ids"].shape == (1, 1) and decode["input_ids"].max() < VOCAB
    assert decode["attention_mask"].shape == (1, 1025)
    assert decode["position_ids"].tolist() == [[1024]]
    assert decode["past.1.value"].shape == (1, KV_HEADS, 1024, HEAD_DIM)
    prefill = make_feeds(pruned, SCENARIOS["prefill-512"])
    assert "past.1.key" not in prefill
    assert prefill["past.2.key"].shape == (1, KV_HEADS, 0, HEAD_DIM)
    assert prefill["input_ids"].shape == (1, 512)
    assert make_feeds(full, SCENARIOS["decode-b32"])["input_ids"].shape == (32, 1)

    report = compare_latency(
        full, pruned, scenarios=["decode-128", "prefill-128"], pairs=10, warmup=1, bandwidth=False
    )
    assert all(math.isfinite(r.ratio_median) for r in report.results)


def test_requesting_an_absent_provider_fails_loudly(tmp_path):
    model = _matmul_chain(tmp_path / "a.onnx", 1)
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider: nothing to refuse")
    with pytest.raises(GraphfuseError, match="CUDAExecutionProvider is not available"):
        create_session(model, "ort-cuda")
    with pytest.raises(GraphfuseError, match="CUDAExecutionProvider is not available"):
        compare_latency(model, model, backend="ort-cuda", pairs=1, warmup=0, bandwidth=False)


def test_silent_fallback_to_cpu_is_refused(tmp_path, monkeypatch):
    # onnxruntime-gpu on a machine without a usable GPU lists CUDA but runs on the CPU.
    model = _matmul_chain(tmp_path / "a.onnx", 1)
    real_session = ort.InferenceSession

    def cpu_session(source, options=None, providers=None):
        return real_session(source, options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    monkeypatch.setattr(ort, "InferenceSession", cpu_session)
    with pytest.raises(
        GraphfuseError, match="fell back to CPUExecutionProvider instead of CUDAExecutionProvider"
    ):
        create_session(model, "ort-cuda")


def test_sessions_are_pinned(tmp_path):
    session = create_session(_matmul_chain(tmp_path / "a.onnx", 1), threads=1)
    assert session.get_providers()[0] == "CPUExecutionProvider"
    options = session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL


def test_pairs_alternate_their_order():
    calls: list[str] = []
    times_a, times_b = time_pairs(
        lambda: calls.append("a"), lambda: calls.append("b"), pairs=4, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a"]
    assert len(times_a) == len(times_b) == 4


def test_bandwidth_probe_returns_a_positive_number():
    measured = measure_bandwidth(buffer_mib=64, repeats=2)
    assert measured.read_gbps > 0 and measured.copy_gbps > 0
    with pytest.raises(GraphfuseError, match="at least 64 MiB"):
        measure_bandwidth(buffer_mib=8)


def test_bad_arguments_are_graphfuse_errors(tmp_path):
    model = _matmul_chain(tmp_path / "a.onnx", 1)
    with pytest.raises(GraphfuseError, match="unknown scenario"):
        compare_latency(model, model, scenarios=["decode-7"], bandwidth=False)
    with pytest.raises(GraphfuseError, match="unknown backend"):
        compare_latency(model, model, backend="tvm", bandwidth=False)
    with pytest.raises(GraphfuseError, match="not found"):
        compare_latency(tmp_path / "absent.onnx", model, bandwidth=False)


def _load_tool(name):
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli(tmp_path, capsys):
    tool = _load_tool("compare_latency")
    a = _matmul_chain(tmp_path / "a.onnx", 2)
    argv = [
        str(a),
        str(a),
        "--pairs",
        "3",
        "--warmup",
        "1",
        "--no-bandwidth",
        "--json",
        str(tmp_path / "r.json"),
    ]
    assert tool.main(argv) == 0
    assert "decode-128" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["pairs"] == 3
    assert tool.main([str(a), str(tmp_path / "absent.onnx"), "--no-bandwidth"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compare_latency: error: ONNX file not found") and err.count("\n") == 1
