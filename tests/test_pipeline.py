"""The measured pipeline, step by step, on a small onnxruntime-genai int4 build (six layers,
random weights, SmolLM2's tokenizer) and real text: scan → choose → drop → analyse → fuse → heal
→ evaluate → plan, and the plan replayed by `apply` gives the very model the pipeline scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from graphfuse import corpora, evaluate, genai, pipeline
from graphfuse import plan as plans


@pytest.fixture(scope="module")
def windows(tokenizer_dir: Path) -> pipeline.Windows:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    counts = {"calibration": 10, "validation": 2, "test": 2}
    drawn = corpora.windows(tokenizer, corpora.text_sets(), seq_len=48, counts=counts)
    cal = drawn["calibration"]
    return pipeline.Windows(cal[:8], drawn["validation"], cal[8:], drawn["test"])


@pytest.fixture(scope="module")
def pipe(genai_folder, windows) -> pipeline.Pipeline:
    folder = genai_folder("llama", "int4")
    model = onnx.load(str(genai.model_file(folder)))
    settings = pipeline.Settings(target_stages=4, progress=False, scan_tokens=32)
    return pipeline.Pipeline(model, windows, settings, genai.dims(folder, model))


def test_runs_from_layers() -> None:
    assert pipeline.runs_from_layers([2, 3, 5]) == [(1, 3), (4, 5)]
    assert pipeline.runs_from_layers([2, 3, 4, 5, 6], max_run=3) == [(1, 3), (4, 6)]
    assert pipeline.runs_from_layers([2, 3, 4], max_run=3) == [
        (1, 3),
    ]  # 4 alone is left
    assert pipeline.runs_from_layers([]) == []


def test_scan_and_choose(pipe: pipeline.Pipeline) -> None:
    costs = pipe.scan()
    assert sorted(costs) == [1, 2, 3, 4, 5]  # layer 0's attention joins no two FFN blocks
    assert all(np.isfinite(c) and c > 0 for c in costs.values())
    layers = pipe.choose(costs)
    assert len(layers) == 2  # six FFN stages down to four
    assert sum(b - a for a, b in pipeline.runs_from_layers(layers)) == 2
    assert set(layers) <= set(costs)


def test_run_heals_scores_and_plans(pipe: pipeline.Pipeline, genai_folder, tmp_path: Path) -> None:
    result = pipe.run([2, 3])
    assert result.runs == [(1, 3)]
    assert result.stages == {"original": 6, "attention removed": 6, "final": 4}
    assert set(result.scores) == {"original", "attention removed", "final"}
    for name, by_text in result.scores.items():
        assert set(by_text) == {"in_domain", "test"}
        for s in by_text.values():
            assert np.isfinite(s.perplexity) and 0 <= s.agreement <= 1
            assert (s.agreement == 1.0) == (name == "original")
    assert set(result.choice) == {"0", "0.5", "1"}  # α chosen on validation perplexity
    assert result.dependency is not None and result.dependency.blocks == [1, 2, 3]
    (run,) = result.plan.runs
    assert (run.first, run.last) == (1, 3) and result.plan.attention_removed == [2, 3]
    assert run.heal == ("ffn" if min(result.choice, key=result.choice.get) != "0" else "none")

    # the plan, saved and applied to the folder, rebuilds the model the pipeline scored
    path = plans.save(result.plan, tmp_path / "plan.json")
    folder = genai_folder("llama", "int4")
    out = tmp_path / "applied"
    plans.apply(path, folder, out)
    applied = onnx.load(str(genai.model_file(out)))
    ids = pipe.windows.test
    scored = evaluate.score(pipe.sessions(result.models["final"]), ids, dims=pipe.dims)
    replayed = evaluate.score(pipe.sessions(applied), ids, dims=pipe.dims)
    assert replayed.perplexity == pytest.approx(scored.perplexity, rel=1e-6)
    np.testing.assert_array_equal(replayed.top1, scored.top1)


def test_sessions_run_on_the_cpu(pipe: pipeline.Pipeline) -> None:
    session = pipeline.Sessions(threads=1)(pipe.model)
    assert session.get_providers()[0] == "CPUExecutionProvider"


def test_depth_quality_curve(pipe: pipeline.Pipeline, tmp_path: Path) -> None:
    """Each point removes attention in the order given until its stage count is met."""
    from graphfuse.demo import _plot_curve

    points = pipe.curve([3, 2, 5], [5, 4])
    assert [p["stages"] for p in points] == [5, 4]
    assert [p["layers"] for p in points] == [[3], [2, 3]]
    assert all(np.isfinite(p["test_perplexity"]) for p in points)
    png = tmp_path / "curve.png"
    _plot_curve(points, {"test": 10.0, "in_domain": 12.0}, 4, png)
    assert png.stat().st_size > 10_000


def test_linear_heal_and_its_plan_replay(
    pipe: pipeline.Pipeline, genai_folder, tmp_path: Path
) -> None:
    """heal="linear": the refit reads [h, n̂(X)] (H more rows in the plan's weights), the plan
    records it per run, and `apply` rebuilds the model the pipeline scored; heal_target="input"
    is recorded as the fit's target."""
    pipe.settings.heal, pipe.settings.heal_target = "linear", "input"
    try:
        result = pipe.run([2, 3], analyse=False, only_final=True)
    finally:
        pipe.settings.heal, pipe.settings.heal_target = "ffn", "original"
    (run,) = result.plan.runs
    assert run.heal == "linear", result.choice  # α = 0 (no refit) would record "none"
    assert run.target == "input"
    hidden = pipe.found.blocks[0].hidden
    width = sum(b.intermediate for b in pipe.found.blocks[1:4])
    assert result.plan.weights[run.key].shape == (width + hidden, hidden)
    path = plans.save(result.plan, tmp_path / "plan.json")
    out = tmp_path / "applied"
    plans.apply(path, genai_folder("llama", "int4"), out)
    applied = onnx.load(str(genai.model_file(out)))
    ids = pipe.windows.test
    scored = evaluate.score(pipe.sessions(result.models["final"]), ids, dims=pipe.dims)
    replayed = evaluate.score(pipe.sessions(applied), ids, dims=pipe.dims)
    assert replayed.perplexity == pytest.approx(scored.perplexity, rel=1e-6)
