"""Latency in onnxruntime-genai (graphfuse.genai_latency) on small random builds: the original,
attention removed, and fused; tiny token counts, so this checks the harness, not the speed."""

from __future__ import annotations

import json
import math
import os
import sys
from itertools import product
from pathlib import Path

import numpy as np
import pytest
from conftest import DROPPED
from test_genai import RUN

import graphfuse
from graphfuse import genai_latency
from graphfuse.errors import GraphfuseError

THREADS = (None, 1)
ROUNDS = 2


@pytest.fixture(scope="module")
def folders(
    genai_folder,
    dropped,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    fused = tmp_path_factory.mktemp("latency") / "fused"
    graphfuse.fuse_file(dropped("llama", "int4"), fused, runs=str(RUN))
    return {
        "original": genai_folder("llama", "int4"),
        f"no-attn {DROPPED}": dropped("llama", "int4"),
        "fused": fused,
    }


def _snapshot(folders: dict[str, Path]) -> dict[str, object]:
    return {
        name: (
            (path / "genai_config.json").read_bytes(),
            sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir()),
        )
        for name, path in folders.items()
    }


@pytest.fixture(scope="module")
def measured(folders: dict[str, Path]) -> tuple[genai_latency.LatencyReport, dict[str, object]]:
    before = _snapshot(folders)
    report = genai_latency.compare(
        folders, threads=THREADS, rounds=ROUNDS, prompt=8, new=8, prefill=16
    )
    return report, before


def test_report_covers_every_model_and_setting(measured) -> None:
    report, _ = measured
    assert report.baseline == "original"
    assert len(report.results) == len(report.folders) * len(THREADS)
    assert {(r.model, r.threads) for r in report.results} == set(product(report.folders, THREADS))
    for r in report.results:
        assert r.decode.runs == r.prefill.runs == ROUNDS
        assert math.isfinite(r.tokens_per_s) and r.tokens_per_s > 0
        assert 0 < r.tokens_per_s_p90 <= r.tokens_per_s
        for stats in (r.decode, r.prefill):
            assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms


def test_ratios_are_ratios_of_medians(measured) -> None:
    report, _ = measured
    data = json.loads(report.to_json())
    assert data["baseline"] == "original" and len(data["results"]) == len(report.results)
    for t, kind in product(THREADS, genai_latency.KINDS):
        medians = {m: getattr(report.result(m, t), kind).median_ms for m in report.folders}
        assert report.ratio("original", "original", t, kind) == 1.0
        pairs = report.pairs()
        assert len(pairs) == 3 and pairs[0] == (f"no-attn {DROPPED}", "original")
        assert ("fused", f"no-attn {DROPPED}") in pairs  # fused vs attention-removed
        for model, over in pairs:
            expected = medians[over] / medians[model]
            assert report.ratio(model, over, t, kind) == pytest.approx(expected, rel=1e-12)
            stored = data["ratios"][genai_latency.threads_label(t)][f"{model} vs {over}"][kind]
            assert stored == pytest.approx(expected, rel=1e-12)


def test_table_and_plot(measured, tmp_path: Path) -> None:
    report, _ = measured
    table = genai_latency.format_table(report)
    assert all(name in table for name in report.folders)
    assert "tok/s" in table and "×" in table and "1 thread" in table and "default threads" in table
    png = genai_latency.plot(report, tmp_path / "sub" / "latency.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_folders_are_not_modified(measured, folders: dict[str, Path]) -> None:
    _, before = measured
    assert _snapshot(folders) == before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_thread_setting_reaches_the_session(genai_folder) -> None:
    """The overlay sizes ONNX Runtime's intra-op pool: n threads add n - 1 OS threads."""
    folder = genai_folder("llama", "int4")
    genai_latency.load(folder, 1)  # the first model also starts the runtime's own threads

    def added(threads: int | None) -> int:
        count = len(os.listdir("/proc/self/task"))
        model = genai_latency.load(folder, threads)
        grown = len(os.listdir("/proc/self/task")) - count
        del model
        return grown

    assert added(1) == 0
    assert added(3) == 2
    assert added(None) == genai_latency.default_threads() - 1


def test_refusals(genai_folder, tmp_path: Path) -> None:
    folder = genai_folder("llama", "int4")  # context_length 256
    with pytest.raises(GraphfuseError, match="context_length"):
        genai_latency.compare({"a": folder}, prompt=200, new=100, prefill=16, rounds=1)
    with pytest.raises(GraphfuseError, match="ids holds 4 tokens"):
        genai_latency.compare({"a": folder}, prompt=8, new=2, prefill=8, ids=np.arange(4))
    with pytest.raises(GraphfuseError, match=r"genai_config\.json"):
        genai_latency.load(tmp_path, None)
    with pytest.raises(GraphfuseError, match="threads must be"):
        genai_latency.load(folder, 0)


def test_amdahl_from_the_per_node_profile(folders) -> None:
    """The fused run's nodes replace the blocks' nodes: the profile sees both sides, and the
    bound follows from them as Amdahl's law says."""
    names = list(folders)
    b = genai_latency.amdahl(folders[names[1]], folders["fused"], past=8, steps=5)
    assert b["segments_ms_removed"] > 0 and b["segments_ms_fused"] > 0
    assert 0 < b["segment_share"] < 1
    saved = b["segments_ms_removed"] - b["segments_ms_fused"]
    assert b["bound"] == pytest.approx(b["step_ms_removed"] / (b["step_ms_removed"] - saved))
    assert math.isfinite(b["measured"]) and b["measured"] > 0
