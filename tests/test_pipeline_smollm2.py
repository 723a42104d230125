"""The method on the real model: attention removal (logits model and KV-cache decoder), fusion,
repair and the TensorRT static check on SmolLM2-135M.

Accuracy is measured, not assumed: the repair test asserts only that refitting moves the fused
model towards the model it was made from, on held-out text.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

import graphfuse
from graphfuse import evaluate, method
from graphfuse.passes.drop_attention import drop_attention, gate_attention
from graphfuse.trt_check import check_tensorrt

pytestmark = pytest.mark.slow

LAYERS = [25, 26, 27, 28]  # attention removed: FFN blocks 24..28 become one run (brief §6)


@pytest.fixture(scope="module")
def logits_model(logits_onnx: Path) -> onnx.ModelProto:
    return onnx.load(logits_onnx)


@pytest.fixture(scope="module")
def removed(logits_model: onnx.ModelProto) -> onnx.ModelProto:
    return drop_attention(logits_model, LAYERS)[0]


def test_every_block_is_found_and_attention_separates_them(logits_model) -> None:
    found = graphfuse.inspect(logits_model)
    assert len(found.blocks) == 30
    assert {(b.hidden, b.intermediate, b.activation, b.dtype) for b in found.blocks} == {
        (576, 1536, "silu", "float32")
    }
    assert found.fusable() == []
    assert all("attention between them" in r.reason for r in found.refusals)
    assert len(found.refusals) == 29


def test_attention_removal_makes_the_run(removed) -> None:
    found = graphfuse.inspect(removed)
    assert [str(r) for r in found.fusable()] == ["24-28"]


def test_removal_equals_gating_the_attention_to_zero(logits_model, removed, windows) -> None:
    """Two independent mechanisms — graph surgery and a zero gate — give the same logits."""
    gated, gates = gate_attention(logits_model)
    ids = windows.evaluation[:1, :64]
    extra = {g: np.array(0.0 if layer in LAYERS else 1.0, np.float32) for layer, g in gates.items()}
    a = method.session(removed).run(["logits"], {"input_ids": ids})[0]
    b = method.session(gated).run(["logits"], {"input_ids": ids, **extra})[0]
    assert np.max(np.abs(a - b)) / np.max(np.abs(b)) < 1e-5


def test_decoder_attention_removal_drops_the_layers_cache(
    decoder_onnx: Path, removed, windows
) -> None:
    decoder = onnx.load(decoder_onnx)
    dropped, report = drop_attention(decoder, LAYERS)
    names = [
        f"{kind}.{i}.{part}" for i in LAYERS for kind in ("past",) for part in ("key", "value")
    ]
    assert report.removed_inputs == sorted(names)
    assert report.removed_outputs == sorted(n.replace("past", "present") for n in names)
    inputs = {v.name for v in dropped.graph.input}
    assert not inputs & set(names) and "past.24.key" in inputs and "attention_mask" in inputs
    # 3 KV heads × 64 dims × key and value × 4 bytes per layer per token
    assert report.kv_bytes_per_token_before == 30 * 3 * 64 * 2 * 4
    assert report.kv_bytes_per_token_after == 26 * 3 * 64 * 2 * 4
    # a prefill through the cut decoder predicts as the cut logits model
    ids = windows.evaluation[:1, :32]
    a = evaluate.score(method.session(dropped), ids).top1
    b = evaluate.score(method.session(removed), ids).top1
    assert np.mean(a == b) == 1.0


def test_fusion_and_repair_on_the_real_model(removed, windows) -> None:
    fused, report = graphfuse.fuse(removed, "24-28")
    assert (report.depth_before.ffn_stages, report.depth_after.ffn_stages) == (30, 26)
    calibration, validation = windows.calibration[:8, :256], windows.validation[:2, :256]
    repaired, (fit,) = method.fuse_and_repair(removed, [(24, 28)], calibration, validation)
    assert fit.validation_error_repaired < fit.validation_error_fused
    ids = windows.evaluation[:2, :256]
    ppl = {name: method.perplexity(m, ids) for name, m in
           (("removed", removed), ("fused", fused), ("repaired", repaired))}  # fmt: skip
    print(ppl)
    assert ppl["repaired"] < ppl["fused"]


def test_tensorrt_static_check_passes_the_original_and_fused_models(
    logits_model, removed, decoder_onnx
) -> None:
    """The exports (logits and KV-cache decoder), attention removal and fusion use only ops
    and types TensorRT 10's parser takes; a CumSum of INT64 (as transformers emits when no
    attention mask is given) would be an error here."""
    fused, _ = graphfuse.fuse(removed, "24-28")
    decoder = onnx.load(decoder_onnx)
    fused_decoder, _ = graphfuse.fuse(drop_attention(decoder, LAYERS)[0], "24-28")
    for model in (logits_model, removed, fused, decoder, fused_decoder):
        errors = [f for f in check_tensorrt(model, "10") if f.severity == "error"]
        assert errors == []
    assert "CumSum" not in {n.op_type for n in logits_model.graph.node}
