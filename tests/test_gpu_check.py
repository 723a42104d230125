"""tools/gpu_check.py on the CPU at --small sizes: figures, the fused-vs-parallel check, layouts.

The script is what runs on a lent GPU, once; these tests make sure it gets there working. One
subprocess runs it end to end; the rest imports it and calls `main(argv)` in-process.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

TOOL = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
FAST = ["--device", "cpu", "--small", "--rounds", "3", "--iters", "2", "--time-budget", "20"]


@pytest.fixture(scope="module")
def gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _write(path: Path, layout: dict[str, Any]) -> Path:
    path.write_text(json.dumps(layout))
    return path


def _layout(**overrides: Any) -> dict[str, Any]:
    return {"num_layers": 8, "hidden": 64, "intermediate": 128, "heads": 4, "kv_heads": 2,
            "attention_removed": [2, 3, 6], "fused_runs": [[1, 3], [5, 6]]} | overrides  # fmt: skip


def test_cpu_run_writes_positive_times_and_a_passed_numeric_check(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), *FAST, "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    figures = json.loads(out.read_text())
    assert figures["dtype"] == "float32" and figures["cuda_graphs"] is False
    assert figures["torch"] == torch.__version__ and figures["small"] is True
    assert not list(tmp_path.glob(".figures.json.*"))  # the atomic write left no temp file

    segment, stack = figures["segment"], figures["stack"]
    check = segment["check"]
    assert check["tolerance"] == 1e-4
    assert 0 <= check["relative_error"] < 1e-5  # fp32: rounding only
    assert 0 <= check["max_abs_error"] < 1e-4
    assert check["passed"] is True
    assert set(segment["timings"]) == {"sequential", "fused"}
    assert set(stack["timings"]) == {"original", "attention removed", "fused"}
    assert set(stack["speedup"]) == {
        "original/attention removed", "original/fused", "attention removed/fused"
    }  # fmt: skip
    for result in (segment, stack):
        assert result["rounds"] == 3 and result["iters"] == 2 and not result["stopped_early"]
        for t in result["timings"].values():
            assert t["median_us"] > 0 and t["p90_us"] >= t["median_us"] and t["samples"] == 3
        assert all(r > 0 for r in result["speedup"].values())
    assert stack["config"]["ffn_stages"] == 20 and stack["config"]["num_layers"] == 30
    assert "check: fused vs parallel reference" in proc.stdout and "speed-up" in proc.stdout


def test_bad_layout_exits_2_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.json", _layout(attention_removed=[2, 6]))
    proc = subprocess.run(
        [sys.executable, str(TOOL), *FAST, "--layout", str(bad)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "gpu_check: error: layout: fused run 1-3: attention of layer(s) [3] not removed"
    ]
    assert "Traceback" not in proc.stdout + proc.stderr


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"attention_removed": [2, 6]}, "fused run 1-3: attention of layer(s) [3] not removed"),
        ({"fused_runs": [[1, 3], [3, 4]], "attention_removed": [2, 3, 4]},
         "fused runs 1-3 and 3-4 overlap"),
        ({"fused_runs": [[5, 8]], "attention_removed": [6, 7]},
         "fused run 5-8 is not inside 0..7 with first < last"),
        ({"attention_removed": [2, 3, 6, 9]}, "attention_removed layer 9 is outside 0..7"),
        ({"fused_runs": [[4, 4]]}, "fused run 4-4 is not inside 0..7 with first < last"),
        ({"heads": 5}, "heads must divide hidden"),
    ],
)  # fmt: skip
def test_bad_layouts_are_refused_with_their_reason(
    gpu_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    overrides: dict[str, Any], reason: str,
) -> None:  # fmt: skip
    bad = _write(tmp_path / "bad.json", _layout(**overrides))
    assert gpu_check.main([*FAST, "--layout", str(bad)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and reason in err


def test_unreadable_layout_is_a_one_line_error(
    gpu_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    for path in (tmp_path / "broken.json", tmp_path / "absent.json"):
        assert gpu_check.main([*FAST, "--layout", str(path)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "cannot read" in err


def test_layout_under_plan_with_extra_keys_is_accepted(gpu_check: ModuleType) -> None:
    layout = gpu_check.parse_layout({"plan": _layout(note="x", scores=[0.1]), "model": "m"})
    assert layout.fused_runs == ((1, 3), (5, 6))
    assert layout.ffn_stages == 8 - 3
    assert gpu_check.parse_layout(gpu_check.DEMO_PLAN).ffn_stages == 20


def test_a_graphfuse_plan_is_a_layout(gpu_check: ModuleType, tmp_path: Path) -> None:
    """The plan.json the demo writes (graphfuse.plan) is read as it is."""
    from graphfuse import plan as plans

    source = plans.Source(30, 576, (1536,) * 30, "0" * 16)
    plan = plans.Plan(source, [4, 5, 9], [plans.RunPlan(3, 5), plans.RunPlan(8, 9)])
    path = plans.save(plan, tmp_path / "plan.json")
    layout = gpu_check.parse_layout(json.loads(path.read_text()))
    assert layout.fused_runs == ((3, 5), (8, 9)) and layout.attention_removed == {4, 5, 9}
    assert (layout.num_layers, layout.hidden, layout.intermediate) == (30, 576, 1536)


def test_stack_variants_follow_the_layout(gpu_check: ModuleType) -> None:
    layout = gpu_check.parse_layout(_layout())
    factory = gpu_check.Factory(torch.device("cpu"), torch.float32)
    variants = gpu_check.stack_variants(layout, factory, past=4)
    kinds = {name: "".join("A" if isinstance(s, gpu_check.Attention) else "F" for s in stages)
             for name, stages in variants.items()}  # fmt: skip
    assert kinds["original"] == "AF" * 8
    assert kinds["attention removed"] == "AFAFFFAFAFFAF"  # layers 2, 3 and 6 lose attention
    assert kinds["fused"] == "AFAFAFAFAF"  # runs 1-3 and 5-6 become one FFN each
    widths = [s.w2.shape[0] for s in variants["fused"] if isinstance(s, gpu_check.Ffn)]
    assert widths == [128, 3 * 128, 128, 2 * 128, 128]


def test_fused_ffn_equals_the_parallel_sum_of_branches(gpu_check: ModuleType) -> None:
    factory = gpu_check.Factory(torch.device("cpu"), torch.float32)
    blocks = [factory.ffn(32, 48) for _ in range(3)]
    x = factory.randn(2, 32)
    wide = gpu_check.fuse(blocks)
    assert wide.gain is None and tuple(wide.w13.shape) == (32, 2 * 3 * 48)
    torch.testing.assert_close(wide(x), sum(b(x) for b in blocks), rtol=1e-5, atol=1e-5)


def test_time_budget_stops_early_and_says_so(
    gpu_check: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "f.json"
    argv = [*FAST, "--only", "segment", "--rounds", "50", "--time-budget", "0", "--json", str(out)]
    assert gpu_check.main(argv) == 0
    segment = json.loads(out.read_text())["segment"]
    assert segment["rounds"] == 1 and segment["stopped_early"] is True
    assert "stopped early" in capsys.readouterr().out
