"""Dependency analysis and run selection.

Numbers: `bypass_ffn` and `dependency_matrix` (ONNX Runtime, float32) against an independent
float64 NumPy computation of the same definitions from the weights the synthetic builder drew.
Selection: the greedy on hand-made matrices, where the right answer is known.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphfuse.analysis import Dependency, bypass_ffn, dependency_matrix, expose, plot_dependency
from graphfuse.errors import GraphfuseError
from graphfuse.models.synthetic import Synthetic, Variant, attend, build, ffn
from graphfuse.selection import select_runs

HIDDEN = 32
# float32 activations against float64: the distances (≈0.1-0.5 here) agree to ~1e-7.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def stack() -> Synthetic:
    return build(HIDDEN, [64] * 6, seed=3)


def batches(n: int = 2, shape: tuple[int, int] = (2, 5), seed: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((*shape, HIDDEN)).astype(np.float32)} for _ in range(n)]


def run(model: onnx.ModelProto, feeds: dict, names: list[str] | None = None) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, feeds)


# -- the independent reference ---------------------------------------------------------------------


def contributions(s: Synthetic, x: np.ndarray, removed: int | None = None):
    """Each block's contribution h_j [tokens, H] in float64 with block ``removed`` skipped, the
    block inputs, and the output."""
    x = x.astype(np.float64)
    h, inputs = {}, {}
    for j, w in enumerate(s.blocks):
        if j != removed:
            inputs[j] = x.reshape(-1, HIDDEN)
            h[j] = ffn(w, x, s.activation)
            x = x + h[j]
            h[j] = h[j].reshape(-1, HIDDEN)
        if j in s.attention:
            x = attend(s.attention[j], x)
    return h, inputs, x


def cos_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = (a * b).sum(-1)
    return 1 - dot / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def reference_dependency(s: Synthetic, feeds: list[dict]) -> tuple[np.ndarray, ...]:
    n = len(s.blocks)
    pair, io, rel, tokens = np.zeros((n, n)), np.zeros(n), np.zeros(n), 0
    for f in feeds:
        base, inputs, _ = contributions(s, f["x"])
        tokens += len(base[0])
        for j in range(n):
            x, h = inputs[j], base[j]
            io[j] += cos_distance(x + h, x).sum()
            rel[j] += (np.linalg.norm(h, axis=-1) / np.linalg.norm(x, axis=-1)).sum()
        for i in range(n):
            removed, _, _ = contributions(s, f["x"], removed=i)
            for j in range(i + 1, n):
                pair[i, j] += cos_distance(base[j], removed[j]).sum()
    return pair / tokens, io / tokens, rel / tokens


# -- model edits -----------------------------------------------------------------------------------


def test_expose_adds_typed_outputs_and_leaves_the_input_alone(stack: Synthetic) -> None:
    before = stack.model.SerializeToString()
    exposed = expose(stack.model, ["block2/residual", "x"])
    assert stack.model.SerializeToString() == before
    assert [o.name for o in exposed.graph.output] == ["y", "block2/residual", "x"]
    assert exposed.graph.output[1].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = batches(1)[0]
    y, mid, same = run(exposed, x)
    _, inputs, out = contributions(stack, x["x"])
    np.testing.assert_allclose(y, out, atol=TOLERANCE * np.abs(out).max())
    np.testing.assert_allclose(mid.reshape(-1, HIDDEN), inputs[3], atol=TOLERANCE)
    np.testing.assert_array_equal(same, x["x"])


def test_expose_refuses_a_value_nobody_computes(stack: Synthetic) -> None:
    with pytest.raises(GraphfuseError, match="'nowhere': no node computes it"):
        expose(stack.model, ["nowhere"])


@pytest.mark.parametrize("block", [0, 2, 5])
def test_bypass_ffn_equals_the_model_without_that_block(stack: Synthetic, block: int) -> None:
    bypassed = bypass_ffn(stack.model, block)
    onnx.checker.check_model(bypassed, full_check=True)
    # The block's branch is gone, weights and all; the rest is untouched.
    assert not any(n.name.startswith(f"block{block}/") for n in bypassed.graph.node)
    assert not any(t.name.startswith(f"block{block}/") for t in bypassed.graph.initializer)
    assert sum(n.name.startswith("block") for n in bypassed.graph.node) == (
        sum(n.name.startswith("block") for n in stack.model.graph.node) * 5 // 6
    )
    x = batches(1)[0]
    (y,) = run(bypassed, x)
    _, _, expected = contributions(stack, x["x"], removed=block)
    np.testing.assert_allclose(y, expected, atol=TOLERANCE * np.abs(expected).max())


def test_bypass_ffn_refuses_a_block_that_does_not_exist(stack: Synthetic) -> None:
    with pytest.raises(GraphfuseError, match="no FFN block 6: the model has blocks 0-5"):
        bypass_ffn(stack.model, 6)


# -- the dependency matrix -------------------------------------------------------------------------


def test_dependency_matrix_equals_the_numpy_definition(stack: Synthetic) -> None:
    feeds = batches(3)
    dep = dependency_matrix(stack.model, feeds, progress=False)
    pair, io, rel = reference_dependency(stack, feeds)
    assert dep.blocks == list(range(6)) and dep.tokens == 30
    upper = np.triu(np.ones((6, 6), bool), k=1)
    assert np.isnan(dep.matrix[~upper]).all()  # diagonal and lower triangle
    np.testing.assert_allclose(dep.matrix[upper], pair[upper], rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(dep.io_cosine_distance, io, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(dep.relative_norm, rel, rtol=0, atol=TOLERANCE)
    assert (dep.matrix[upper] > 1e-3).all()  # the blocks do depend on each other


def test_dependency_with_attention_and_a_subset_of_blocks() -> None:
    # Attention between blocks 2 and 3: removing block 1 reaches block 4 through it. The subset
    # makes every bypass session start at a cut residual input fed from the baseline, and the
    # reshape-wrapped weights keep reading the graph input there as well.
    s = build(HIDDEN, [64] * 5, attention_after={2}, variant=Variant(weights="reshape"), seed=5)
    feeds = batches(2)
    dep = dependency_matrix(s.model, iter(feeds), blocks=[4, 1, 3], progress=False)
    pair, io, _ = reference_dependency(s, feeds)
    assert dep.blocks == [1, 3, 4]
    for i, j in [(1, 3), (1, 4), (3, 4)]:
        assert dep.at(i, j) == pytest.approx(pair[i, j], abs=TOLERANCE)
    assert np.isnan(dep.at(4, 1)) and np.isnan(dep.at(0, 1))
    np.testing.assert_allclose(dep.io_cosine_distance, io[[1, 3, 4]], atol=TOLERANCE)


def test_dependency_refuses_no_batches_and_unknown_blocks(stack: Synthetic) -> None:
    with pytest.raises(GraphfuseError, match="feeds_batches is empty"):
        dependency_matrix(stack.model, [], progress=False)
    with pytest.raises(GraphfuseError, match=r"blocks: \[9\]: the model has FFN blocks 0-5"):
        dependency_matrix(stack.model, batches(1), blocks=[2, 9], progress=False)


def test_dependency_json_round_trip_and_heatmap(stack: Synthetic, tmp_path) -> None:
    dep = dependency_matrix(stack.model, batches(1), progress=False)
    back = Dependency.from_json(dep.to_json())
    assert back.blocks == dep.blocks and back.tokens == dep.tokens
    np.testing.assert_array_equal(back.matrix, dep.matrix)  # NaN included
    np.testing.assert_array_equal(back.relative_norm, dep.relative_norm)
    path = plot_dependency(dep, tmp_path / "dependency.png", title="synthetic")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dependency.png"]  # no temp file left


# -- selection -------------------------------------------------------------------------------------


def blocky_matrix() -> np.ndarray:
    """Six blocks in one run; blocks 0-2 barely depend on each other, 3-5 a little more, and
    the two groups strongly."""
    m = np.full((6, 6), 0.5)
    m[:3, :3] = 0.01
    m[3:, 3:] = 0.02
    m[np.tril_indices(6)] = np.nan
    return m


def test_select_prefers_low_dependency_and_longer_runs_on_ties() -> None:
    m = blocky_matrix()
    one = select_runs(m, [(0, 5)], target_stages=4)
    assert one.runs == [(0, 2)] and one.stages_after == 4
    two = select_runs(m, [(0, 5)], target_stages=2)
    assert two.runs == [(0, 2), (3, 5)] and two.stages_after == 2
    assert [(d.span, d.kept, d.score_max) for d in two.decisions] == [
        ("0-2", True, 0.01),
        ("3-5", True, 0.02),
    ]
    assert two.decisions[0].score_sum == pytest.approx(0.03)
    assert not two.notes


def test_select_grows_chosen_pairs_into_longer_runs() -> None:
    # Pairs score lowest: 0-1 and 2-3 come first; 1-2 then joins them into one run 0-3.
    m = np.full((4, 4), np.nan)
    m[0, 1], m[1, 2], m[2, 3], m[0, 2], m[1, 3], m[0, 3] = 0.1, 0.3, 0.1, 0.5, 0.5, 0.5
    chosen = select_runs(m, [(0, 3)], target_stages=1)
    assert chosen.runs == [(0, 3)] and chosen.stages_after == 1
    assert [d.span for d in chosen.decisions] == ["0-1", "2-3", "0-3"]
    assert not chosen.notes


def test_select_reports_an_unreachable_target() -> None:
    m = np.full((4, 4), np.nan)
    m[0, 1], m[1, 2], m[2, 3], m[0, 2], m[1, 3], m[0, 3] = 0.1, 0.3, 0.1, 0.5, 0.5, 0.5
    chosen = select_runs(m, [(0, 3)], target_stages=0)  # one run of all blocks is one stage
    assert chosen.runs == [(0, 3)] and chosen.stages_after == 1
    assert "target of 0 FFN stages not reached: 1 remain" in chosen.notes[0]


def test_select_with_check_rejects_a_run_over_budget_and_says_why() -> None:
    calls = []

    def perplexity(runs: list[tuple[int, int]]) -> float:
        calls.append(list(runs))
        # Fusing anything with block 3 costs 5 %; other runs 0.1 % each.
        return 10.0 * (1 + sum(0.05 if a <= 3 <= b else 0.001 for a, b in runs))

    chosen = select_runs(blocky_matrix(), [(0, 5)], max_increase=0.02, check=perplexity)
    assert chosen.baseline == 10.0 and calls[0] == []
    assert chosen.runs == [(0, 2), (4, 5)] and chosen.stages_after == 3
    rejected = [d for d in chosen.decisions if not d.kept]
    assert rejected[0].span == "3-5" and all(
        int(d.span.split("-")[0]) <= 3 <= int(d.span.split("-")[1]) for d in rejected
    )  # every refused run (or union of runs) holds block 3
    assert rejected[0].value == pytest.approx(10.51)
    assert "10.51 > 10.2 = baseline 10 × (1 + 0.02)" in rejected[0].reason
    assert [(d.span, d.value) for d in chosen.decisions if d.kept] == [
        ("0-2", pytest.approx(10.01)),
        ("4-5", pytest.approx(10.02)),
    ]
    assert [(0, 2), (4, 5)] in calls  # checked with everything chosen so far


def test_keep_last_leaves_the_last_block_of_each_run_unfused() -> None:
    chosen = select_runs(blocky_matrix(), [(0, 5)], target_stages=4, keep_last=True)
    assert chosen.runs == [(0, 1), (3, 4)] and chosen.stages_after == 4
    assert [(d.span, d.fused) for d in chosen.decisions] == [("0-2", "0-1"), ("3-5", "3-4")]


def test_select_with_a_partial_dependency_needs_n_blocks() -> None:
    m = blocky_matrix()[3:, 3:]
    dep = Dependency([3, 4, 5], m, np.zeros(3), np.zeros(3), tokens=1)
    with pytest.raises(GraphfuseError, match="n_blocks is needed"):
        select_runs(dep, [(0, 5)], target_stages=2)
    chosen = select_runs(dep, [(0, 5)], n_blocks=6, target_stages=2)
    assert chosen.runs == [(3, 5)] and chosen.stages_after == 4
    assert "candidate(s) skipped: they hold block pairs M was not measured for" in chosen.notes[0]


@pytest.mark.slow
def test_dependency_matrix_of_a_torch_export_equals_torch(tmp_path) -> None:
    # A dynamo export: rotary tables and the causal mask are computed from the graph inputs,
    # and attention sits between blocks, so the cut sessions must keep those side computations.
    torch = pytest.importorskip("torch")
    from graphfuse.models.llama import BlockConfig, LlamaLike, LlamaLikeConfig, export_onnx

    on, off = BlockConfig(), BlockConfig(attention=False)
    model = LlamaLike(LlamaLikeConfig(layers=4, blocks=(on, off, on, off)))
    path = export_onnx(model, tmp_path / "llama.onnx", batch=2, seq=8)
    rng = np.random.default_rng(0)
    ids = [rng.integers(0, 256, (2, 8)) for _ in range(2)]
    dep = dependency_matrix(path, [{"input_ids": i} for i in ids], progress=False)

    reference = model.double()  # float64 copy of the maths, independent of ONNX Runtime

    def deltas(tokens: np.ndarray, removed: int | None = None) -> list:
        with torch.no_grad():
            x = reference.embed(torch.from_numpy(tokens))
            out = []
            for k in range(4):
                x = reference.block(k).attend(x)
                h = reference.block(k).ffn_delta(x)
                out.append(h.reshape(-1, h.shape[-1]).numpy())
                x = x if k == removed else x + h
            return out

    expected = np.zeros((4, 4))
    for tokens in ids:
        base = deltas(tokens)
        for i in range(3):
            without = deltas(tokens, removed=i)
            for j in range(i + 1, 4):
                expected[i, j] += cos_distance(base[j], without[j]).sum() / 32
    for i in range(3):
        for j in range(i + 1, 4):
            assert dep.at(i, j) == pytest.approx(expected[i, j], abs=TOLERANCE)


def test_dependency_of_a_model_with_external_data(tmp_path) -> None:
    model = build(HIDDEN, [64] * 3, seed=4).model
    feeds = batches(1)
    expected = dependency_matrix(model, feeds, progress=False)
    path = tmp_path / "model.onnx"
    # Every tensor external, the small axes and eps constants too (and the saved proto changes
    # in place, which is why the model is this test's own).
    onnx.save(model, path, save_as_external_data=True, location="model.data", size_threshold=0)
    from_file = dependency_matrix(path, feeds, progress=False)
    np.testing.assert_array_equal(from_file.matrix, expected.matrix)
    proto = onnx.load(path, load_external_data=False)
    with pytest.raises(GraphfuseError, match="stored as external data: pass the model's path"):
        dependency_matrix(proto, feeds, progress=False)
    with_dir = dependency_matrix(proto, feeds, progress=False, base_dir=tmp_path)
    np.testing.assert_array_equal(with_dir.matrix, expected.matrix)
