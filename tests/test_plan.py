"""Plans: what a pass decided, saved as JSON + safetensors and replayed by `graphfuse apply`.

Round trips are exact (the applied model's tensors equal the in-memory result's, byte for
byte); a plan is refused, in one line, on a model it was not made on, with a schema it does not
have, or naming layers the model lacks; `apply` writes nothing when it fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import graphfuse
from graphfuse import plan as plans
from graphfuse.cli import main
from graphfuse.errors import GraphfuseError
from graphfuse.models.synthetic import build
from graphfuse.passes.drop_attention import drop_attention
from graphfuse.repair import repair_runs

HIDDEN = 32
WIDTHS = [64, 48, 64, 64, 32]


def _feeds(rng: np.random.Generator, n: int, batch: int = 2) -> list[dict[str, np.ndarray]]:
    return [{"x": rng.standard_normal((batch, 16, HIDDEN)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    s = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


def _tensors(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


@pytest.fixture
def model(tmp_path: Path) -> Path:
    """FFN blocks 0-4 with attention between every two (before blocks 1-4)."""
    path = tmp_path / "model.onnx"
    onnx.save(build(HIDDEN, WIDTHS, attention_after={0, 1, 2, 3}, seed=11).model, path)
    return path


def _healed_plan(model_path: Path, heal: str = "ffn") -> tuple[plans.Plan, onnx.ModelProto]:
    """Attention of layers 2 and 3 removed, run 1-3 fused and refitted against the original
    (``heal="linear"``: over the normalised run input as well)."""
    original = onnx.load(model_path)
    removed, _ = drop_attention(original, [2, 3])
    rng = np.random.default_rng(0)
    cache: dict = {}
    repaired, (fit,) = repair_runs(removed, [(1, 3)], _feeds(rng, 4), _feeds(rng, 2),
                                   progress=False, cache=cache, reference=original,
                                   linear=heal == "linear")  # fmt: skip
    found = graphfuse.inspect(original)
    run = plans.RunPlan(1, 3, heal, "original", fit.lam)
    plan = plans.Plan(plans.source_of(found), [2, 3], [run], {run.key: cache[(1, 3)][0]})
    return plan, repaired


@pytest.mark.parametrize("heal", ["ffn", "linear"])
def test_save_load_apply_round_trips_exactly(model: Path, tmp_path: Path, heal: str) -> None:
    plan, repaired = _healed_plan(model, heal)
    width = sum(WIDTHS[1:4]) + (HIDDEN if heal == "linear" else 0)
    assert plan.weights[plan.runs[0].key].shape == (width, HIDDEN)
    path = plans.save(plan, tmp_path / "plan.json")
    assert (tmp_path / "plan.safetensors").is_file()
    loaded = plans.load(path)
    assert loaded.as_dict() == plan.as_dict()
    assert loaded.weights.keys() == plan.weights.keys()
    for key, w in plan.weights.items():
        assert loaded.weights[key].dtype == np.float32
        assert loaded.weights[key].tobytes() == np.asarray(w, np.float32).tobytes()
    data = json.loads(path.read_text())
    assert data["schema"] == "graphfuse.plan" and data["version"] == 1
    assert data["runs"] == [{"layers": [1, 3], "heal": heal, "target": "original",
                             "lambda": plan.runs[0].lam}]  # fmt: skip

    out = tmp_path / "applied.onnx"
    report = graphfuse.apply(path, model, out)
    assert report.runs_fused == ["1-3"]
    applied = onnx.load(out)
    onnx.checker.check_model(applied, full_check=True)
    assert _tensors(applied) == _tensors(repaired)
    x = np.random.default_rng(1).standard_normal((1, 16, HIDDEN)).astype(np.float32)
    np.testing.assert_array_equal(_run(applied, x), _run(repaired, x))


def test_apply_to_the_model_with_attention_already_removed(model: Path, tmp_path: Path) -> None:
    """The removal a source no longer needs is skipped: the same result from either model."""
    plan, repaired = _healed_plan(model)
    removed = tmp_path / "removed.onnx"
    onnx.save(drop_attention(onnx.load(model), [2, 3])[0], removed)
    graphfuse.apply(plan, removed, tmp_path / "a.onnx")
    assert _tensors(onnx.load(tmp_path / "a.onnx")) == _tensors(repaired)


def test_cli_save_plan_then_apply(model: Path, tmp_path: Path, capsys) -> None:
    """drop-attention and fuse write plans; replaying the fuse plan on the original gives the
    model the two commands made, byte for byte."""
    dropped, fused = tmp_path / "dropped.onnx", tmp_path / "fused.onnx"
    assert main(["drop-attention", str(model), "--layers", "2-3", "-o", str(dropped),
                 "--save-plan", str(tmp_path / "drop.json")]) == 0  # fmt: skip
    assert main(["fuse", str(dropped), "--runs", "1-3", "-o", str(fused),
                 "--save-plan", str(tmp_path / "fuse.json")]) == 0  # fmt: skip
    drop_plan, fuse_plan = plans.load(tmp_path / "drop.json"), plans.load(tmp_path / "fuse.json")
    assert drop_plan.attention_removed == [2, 3] and drop_plan.runs == []
    assert fuse_plan.attention_removed == [2, 3]  # the fused model's input lacked that attention
    assert [(r.first, r.last, r.heal) for r in fuse_plan.runs] == [(1, 3, "none")]
    assert not (tmp_path / "fuse.safetensors").exists()  # nothing refitted, no weights file
    assert drop_plan.source == fuse_plan.source  # removal changes no norm gain
    out = tmp_path / "replayed.onnx"
    assert main(["apply", str(tmp_path / "fuse.json"), str(model), "-o", str(out)]) == 0
    assert "attention removed: 2, 3; runs fused: 1-3" in capsys.readouterr().out
    assert _tensors(onnx.load(out)) == _tensors(onnx.load(fused))


def _refused(argv: list[str], capsys) -> str:
    capsys.readouterr()  # what came before (a builder's progress bars) is not the error
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("graphfuse: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_a_plan_for_another_model_is_refused(model: Path, tmp_path: Path, capsys) -> None:
    plan, _ = _healed_plan(model)
    plans.save(plan, tmp_path / "plan.json")
    other_weights = tmp_path / "other.onnx"  # same shapes, other gains
    onnx.save(build(HIDDEN, WIDTHS, attention_after={0, 1, 2, 3}, seed=12).model, other_weights)
    other_shape = tmp_path / "shape.onnx"
    onnx.save(build(HIDDEN, [64] * 5, attention_after={0, 1, 2, 3}, seed=11).model, other_shape)
    fewer = tmp_path / "fewer.onnx"
    onnx.save(build(HIDDEN, WIDTHS[:2], attention_after={1}, seed=11).model, fewer)
    out = tmp_path / "out.onnx"
    plan_arg = str(tmp_path / "plan.json")
    assert "other weights" in _refused(
        ["apply", plan_arg, str(other_weights), "-o", str(out)], capsys
    )
    assert "I=32/48/64; " in _refused(["apply", plan_arg, str(other_shape), "-o", str(out)], capsys)
    assert "layers up to" in _refused(["apply", plan_arg, str(fewer), "-o", str(out)], capsys)
    assert (
        not out.exists() and sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []
    )


def test_damaged_plans_are_refused(model: Path, tmp_path: Path, capsys) -> None:
    plan, _ = _healed_plan(model)
    path = plans.save(plan, tmp_path / "plan.json")
    data = json.loads(path.read_text())
    out = str(tmp_path / "out.onnx")

    def refused_with(change, expected: str) -> None:
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(change(json.loads(json.dumps(data)))))
        assert expected in _refused(["apply", str(bad), str(model), "-o", out], capsys)

    refused_with(lambda d: {**d, "version": 99}, "schema version 99")
    refused_with(lambda d: {**d, "schema": "other"}, "is not a graphfuse plan")
    refused_with(lambda d: {**d, "attention_removed": [2, 7]}, "names layer 7")
    refused_with(lambda d: {k: v for k, v in d.items() if k != "runs"}, "'runs'")
    refused_with(lambda d: {**d, "runs": [{**d["runs"][0], "layers": [1, 4]}]}, "run 1-4 are none")
    refused_with(lambda d: {**d, "weights": "../elsewhere.safetensors"}, "not beside it")
    refused_with(lambda d: {**d, "runs": [{**d["runs"][0], "layers": "1-3"}]}, "is damaged")
    refused_with(lambda d: {**d, "runs": [{**d["runs"][0], "layers": [1.5, 3]}]}, "1.5")
    refused_with(lambda d: {**d, "runs": [{**d["runs"][0], "layers": [3, 1]}]}, "run 3-1")
    refused_with(lambda d: {**d, "attention_removed": ["x"]}, "'x' is not a whole number")
    refused_with(lambda d: {**d, "weights": 7}, "is damaged")
    (tmp_path / "text.json").write_bytes(b"\x00\x01 not json")
    assert "is not JSON" in _refused(
        ["apply", str(tmp_path / "text.json"), str(model), "-o", out], capsys
    )
    assert "does not exist" in _refused(
        ["apply", str(tmp_path / "none.json"), str(model), "-o", out], capsys
    )
    assert not Path(out).exists()


def test_save_plan_path_is_checked_before_any_work(model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "dropped.onnx"
    err = _refused(["drop-attention", str(model), "--layers", "2", "-o", str(out),
                    "--save-plan", str(tmp_path / "plan.txt")], capsys)  # fmt: skip
    assert "must end in .json" in err and not out.exists()


def test_downs_of_the_wrong_shape_are_refused(model: Path) -> None:
    removed, _ = drop_attention(onnx.load(model), [2, 3])
    with pytest.raises(GraphfuseError, match=r"is \[10, 32\], not \[176, 32\]"):
        graphfuse.api._fuse(removed, [(1, 3)], None, False, False, None,
                            downs={(1, 3): np.zeros((10, HIDDEN), np.float32)})  # fmt: skip


# -- onnxruntime-genai builds: one plan, both precisions ---------------------------------------


def _down(model: onnx.ModelProto, a: int, b: int) -> np.ndarray:
    from graphfuse.repair import down_weight

    return down_weight(model, a, b)


def test_one_plan_applies_to_the_fp32_and_int4_builds(genai_folder, tmp_path: Path) -> None:
    """A plan made on the int4 build names layers and a gain digest that the fp32 build of the
    same Hugging Face folder matches: applied to each, the refitted weight is stored exactly
    (fp32) or requantised by onnxruntime's quantiser (int4, as `set_down_weight` does), and
    onnxruntime-genai generates from both folders."""
    from graphfuse import genai
    from graphfuse.models import genai_build
    from graphfuse.repair import set_down_weight

    int4, fp32 = genai_folder("llama", "int4"), genai_folder("llama", "fp32")
    found = graphfuse.inspect(int4)
    assert plans.source_of(found) == plans.source_of(graphfuse.inspect(fp32))
    dropped, _ = drop_attention(onnx.load(str(genai.model_file(int4))), [2, 3, 4])
    fused, _ = graphfuse.fuse(dropped, [(1, 4)])
    join = _down(fused, 1, 4)
    refit = join + 0.01 * np.random.default_rng(0).standard_normal(join.shape).astype(np.float32)
    run = plans.RunPlan(1, 4, "ffn", "original", 0.1)
    plan = plans.Plan(plans.source_of(found), [2, 3, 4], [run], {run.key: refit})
    path = plans.save(plan, tmp_path / "plan.json")

    for folder, precision in ((int4, "int4"), (fp32, "fp32")):
        out = tmp_path / f"applied-{precision}"
        assert main(["apply", str(path), str(folder), "-o", str(out)]) == 0
        applied = onnx.load(str(out / "model.onnx"))
        if precision == "fp32":
            np.testing.assert_array_equal(_down(applied, 1, 4), refit)
        else:
            expected = set_down_weight(fused, 1, 4, refit)  # requantised in place
            np.testing.assert_array_equal(_down(applied, 1, 4), expected)
            assert 0 < np.abs(expected - refit).max() < 0.2 * np.abs(refit).max()
        config = json.loads((out / "genai_config.json").read_text())
        assert config["model"]["decoder"]["num_hidden_layers"] == 3  # six layers, three caches
        assert len(genai_build.generate(out, "def fibonacci(n):", max_new_tokens=4)) == 4


def test_apply_targets(genai_folder, tmp_path: Path, capsys) -> None:
    """--to onnx takes the model file out of a folder; --to genai needs a folder."""
    from graphfuse import genai

    folder = genai_folder("llama", "fp32")
    plan = plans.Plan(plans.source_of(graphfuse.inspect(folder)), [2], [plans.RunPlan(1, 2)])
    path = plans.save(plan, tmp_path / "plan.json")
    out = tmp_path / "model.onnx"
    assert main(["apply", str(path), str(folder), "-o", str(out), "--to", "onnx"]) == 0
    assert [r.first for r in graphfuse.inspect(out).fusable()] == []  # 1-2 is fused: one block
    assert len(graphfuse.inspect(out).blocks) == 5
    err = _refused(["apply", str(path), str(genai.model_file(folder)), "-o",
                    str(tmp_path / "x"), "--to", "genai"], capsys)  # fmt: skip
    assert "needs an onnxruntime-genai folder" in err
