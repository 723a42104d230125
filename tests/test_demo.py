"""`graphfuse demo --quick`, the README's main job in small, on the real SmolLM2-135M: the
onnxruntime-genai int4 build, the pipeline, the plan and the folders rebuilt from it, generation
and timing in onnxruntime-genai, and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graphfuse import plan as plans
from graphfuse.cli import main


@pytest.mark.slow
def test_demo_quick(quick_demo: Path) -> None:
    out = quick_demo
    report = json.loads((out / "report.json").read_text())
    scores = report["pipeline"]["scores"]
    assert set(scores) == {"original", "attention removed", "final"}
    assert report["pipeline"]["stages"]["final"] == 28  # run 24-26 fused
    for by_text in scores.values():
        for s in by_text.values():
            assert 1 < s["perplexity"] < 1000 and 0 < s["agreement"] <= 1
    assert {t["digest"] for t in report["texts"].values()}.__len__() == 3
    plan = plans.load(out / "plan.json")
    assert plan.attention_removed == [25, 26] and [(r.first, r.last) for r in plan.runs] == [
        (24, 26)
    ]
    for name in ("original", "attention removed", "fused + healed"):
        folder = Path(report["folders"][name])
        assert (folder / "genai_config.json").is_file()
        assert all(isinstance(t, str) and t for t in report["generations"][name])
    timing = report["latency"]
    assert timing["table"] and (out / "latency.png").stat().st_size > 10_000
    assert (out / "dependency.png").stat().st_size > 10_000
    text = (out / "report.md").read_text()
    assert "| fused + healed | 28 |" in text and "test" in text
    assert "Amdahl bound" in report["latency"]["table"]


def test_demo_refuses_bad_text_before_any_work(tmp_path: Path, capsys) -> None:
    empty, binary = tmp_path / "empty.txt", tmp_path / "binary.txt"
    empty.write_text("  \n")
    binary.write_bytes(b"\x00\x01\x02 text")
    for bad, why in ((empty, "is empty"), (binary, "binary")):
        out = tmp_path / f"demo-{bad.stem}"
        assert main(["demo", "--text", str(bad), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and "\n" not in err and not out.exists()
    assert main(["demo", "--layers", "0,3", "--out", str(tmp_path / "x")]) == 2
    assert "1-29" in capsys.readouterr().err
