"""`graphfuse apply --to nemotron-nas`: a plan written as the checkpoint format NVIDIA ships its
FFN-fused models in.

The checkpoint is read back by transformers' own Llama with each layer's sublayers replaced as
``block_configs`` says (``_nemotron_reference``), independently of graphfuse, and must compute
what the same plan applied to an onnxruntime-genai fp32 build computes in ONNX Runtime. vLLM
serving it is tested in ``test_vllm.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import _nemotron_reference as reference
import numpy as np
import onnx
import pytest
import torch
from test_plan import _refused  # one line, 'graphfuse: error: …', no traceback

import graphfuse
from graphfuse import evaluate, genai
from graphfuse import plan as plans
from graphfuse.cli import main
from graphfuse.errors import GraphfuseError
from graphfuse.formats import nemotron_nas
from graphfuse.passes.drop_attention import drop_attention
from graphfuse.repair import down_weight

IDS = [1, 504, 3458, 19, 17, 2641, 28, 260, 8425, 314, 2752, 30, 1065, 7, 28, 42, 7, 11, 33, 4]


def _hf(folder: Path) -> Path:
    """The Hugging Face folder the genai_folder fixture built ``folder`` from."""
    return folder.parent / "hf"


def _ort_logits(folder: Path, ids: list[int]) -> np.ndarray:
    path = genai.model_file(folder)
    session = evaluate.make_session(str(path))
    model = onnx.load(str(path), load_external_data=False)
    return session.run(["logits"], genai.prefill_feeds(folder, model, np.array([ids])))[0][0]


@pytest.fixture(scope="module")
def healed_plan(genai_folder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """On the small Llama's fp32 build: attention 2-3 removed, FFN 1-3 fused (width 3×128 = 384,
    padded to 512) with a refitted down projection, plus a plain run 4-5."""
    folder = genai_folder("llama", "fp32")
    found = graphfuse.inspect(folder)
    dropped, _ = drop_attention(onnx.load(str(genai.model_file(folder))), [2, 3, 5])
    fused, _ = graphfuse.fuse(dropped, [(1, 3)])
    join = down_weight(fused, 1, 3)
    assert join.shape == (384, 64)
    refit = join + 0.05 * np.random.default_rng(0).standard_normal(join.shape).astype(np.float32)
    runs = [plans.RunPlan(1, 3, "ffn", "original", 0.1), plans.RunPlan(4, 5)]
    plan = plans.Plan(plans.source_of(found), [2, 3, 5], runs, {runs[0].key: refit})
    return plans.save(plan, tmp_path_factory.mktemp("plan") / "plan.json")


def test_the_checkpoint_computes_what_the_fused_onnx_model_computes(
    genai_folder, healed_plan: Path, tmp_path: Path, capsys
) -> None:
    folder = genai_folder("llama", "fp32")
    nas, onnx_out = tmp_path / "nas", tmp_path / "genai"
    assert main(["apply", str(healed_plan), str(_hf(folder)), "--to", "nemotron-nas",
                 "-o", str(nas)]) == 0  # fmt: skip
    assert "FFN stages 6 -> 3, attention layers 3" in capsys.readouterr().out
    assert main(["apply", str(healed_plan), str(folder), "-o", str(onnx_out)]) == 0

    config = json.loads((nas / "config.json").read_text())
    assert config["architectures"] == ["DeciLMForCausalLM"]
    assert config["model_type"] == "nemotron-nas"
    blocks = config["block_configs"]
    assert [b["attention"]["no_op"] for b in blocks] == [False, False, True, True, False, True]
    widths = [None if b["ffn"]["no_op"] else nemotron_nas.width_of(b["ffn"]["ffn_mult"], 64)
              for b in blocks]  # fmt: skip
    assert widths == [256, 512, None, None, 256, None]  # 128 → 256; 384 → 512; 256
    assert all(b["attention"].get("n_heads_in_group", 2) == 2 for b in blocks)

    model = reference.load(nas)
    got = reference.logits(model, IDS).numpy()
    want = _ort_logits(onnx_out, IDS)
    np.testing.assert_allclose(got, want, atol=2e-5 * np.abs(want).max())
    # The padded rows are zeros and the fused layer's norm is ones (its gains are in gate/up).
    mlp = model.model.layers[1].mlp
    assert not mlp.gate_proj.weight[384:].any() and not mlp.down_proj.weight[:, 384:].any()
    assert torch.equal(model.model.layers[1].post_attention_layernorm.weight, torch.ones(64))


def test_the_original_plan_gives_the_original_model(genai_folder, tmp_path: Path) -> None:
    """An empty plan: every layer as it was, widths padded, logits those of the source."""
    folder = genai_folder("llama", "fp32")
    plan = plans.Plan(plans.source_of(graphfuse.inspect(folder)))
    ckpt = plans.apply(plan, _hf(folder), tmp_path / "nas", to="nemotron-nas", dtype="bfloat16")
    assert ckpt.ffn_stages == ckpt.ffn_stages_before == 6 and all(ckpt.attention)
    model = reference.load(tmp_path / "nas")
    assert model.model.layers[0].mlp.gate_proj.weight.shape == (256, 64)
    np.testing.assert_allclose(reference.logits(model, IDS).numpy(), _ort_logits(folder, IDS),
                               atol=0.05 * np.abs(_ort_logits(folder, IDS)).max())  # bf16 weights  # fmt: skip


def test_transformers_reads_the_config_offline(
    genai_folder, healed_plan: Path, tmp_path: Path
) -> None:
    """`auto_map` names our configuration_decilm.py, which the folder carries; block configs are
    read by attribute (as vLLM reads them) and serialise back to the same JSON."""
    from transformers import AutoConfig

    out = tmp_path / "nas"
    plans.apply(healed_plan, _hf(genai_folder("llama", "fp32")), out, to="nemotron-nas")
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert type(config).__name__ == "DeciLMConfig" and config.model_type == "nemotron-nas"
    assert config.block_configs[2].attention.no_op and config.block_configs[2].ffn.no_op
    assert config.block_configs[1].ffn.ffn_mult == 12.0  # 3·512 / (2·64)
    assert not hasattr(config.block_configs[1].ffn, "intermediate_size")
    saved = json.loads(config.to_json_string())["block_configs"]
    assert saved == json.loads((out / "config.json").read_text())["block_configs"]
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_shards_and_index(genai_folder, healed_plan: Path, tmp_path: Path) -> None:
    """Past the shard size the weights split into transformers-named files with an index."""
    from safetensors.torch import load_file

    out, whole = tmp_path / "sharded", tmp_path / "whole"
    hf = _hf(genai_folder("llama", "fp32"))
    plan = plans.load(healed_plan)
    nemotron_nas.write(plan, hf, out, shard_bytes=4 << 20)
    nemotron_nas.write(plan, hf, whole)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    files = sorted(set(index.values()))
    assert len(files) > 1 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    merged = {}
    for f in files:
        merged.update(load_file(str(out / f)))
    single = load_file(str(whole / "model.safetensors"))
    assert merged.keys() == single.keys() == index.keys()
    assert all(torch.equal(merged[k], single[k]) for k in single)


def test_ffn_mult_round_trips_through_every_readers_formula() -> None:
    for hidden in (64, 576, 4096, 8192):
        for width in (256, 1536, 4608, 28672, 3 * 28672):
            assert nemotron_nas.width_of(nemotron_nas.ffn_mult(width, hidden), hidden) == width
    with pytest.raises(GraphfuseError, match="cannot be expressed"):
        nemotron_nas.ffn_mult(300, 64)


def test_bad_input_is_refused_in_one_line_and_leaves_nothing(
    genai_folder, healed_plan: Path, tmp_path: Path, capsys
) -> None:
    llama = _hf(genai_folder("llama", "fp32"))
    qwen = _hf(genai_folder("qwen2", "fp32"))
    plan = plans.load(healed_plan)
    out = tmp_path / "out"

    def refused(plan_path: Path, source: Path, output: Path = out) -> str:
        err = _refused(["apply", str(plan_path), str(source), "--to", "nemotron-nas",
                        "-o", str(output)], capsys)  # fmt: skip
        assert not output.exists() and not list(output.parent.glob(f".{output.name}.*"))
        return err

    assert "'qwen2' model" in refused(healed_plan, qwen)
    assert "neither a Hugging Face model folder" in refused(
        healed_plan, genai_folder("llama", "fp32")
    )

    other = tmp_path / "other"  # same shapes, other weights
    from graphfuse.models import genai_build

    genai_build.tiny_hf_folder("llama", other, llama, seed=7, num_hidden_layers=6)
    assert "norm-gain digest" in refused(healed_plan, other)
    fewer = tmp_path / "fewer"
    genai_build.tiny_hf_folder("llama", fewer, llama, num_hidden_layers=4)
    assert "apply it to the checkpoint" in refused(healed_plan, fewer)

    run = plans.RunPlan(1, 3, "linear", "original", 0.1)
    stand_in = np.zeros((384 + 64, 64), np.float32)  # [ΣI + H, H]: h and n̂(X) in
    linear = plans.Plan(plan.source, plan.attention_removed, [run], {run.key: stand_in})
    linear_path = plans.save(linear, tmp_path / "linear.json")
    assert "linear stand-in" in refused(linear_path, llama)
    layer0 = plans.Plan(plan.source, [0, 2], [])
    with pytest.raises(GraphfuseError, match="layer 0"):
        nemotron_nas.write(layer0, llama, out)
    assert not out.exists()

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert "does not exist" in refused(healed_plan, llama, blocker / "out")
    out.mkdir()
    (out / "keep").write_text("")
    assert "already exists" in _refused(["apply", str(healed_plan), str(llama), "--to",
                                         "nemotron-nas", "-o", str(out)], capsys)  # fmt: skip
    assert [p.name for p in out.iterdir()] == ["keep"]


@pytest.mark.slow
def test_a_gguf_source_gives_what_its_hugging_face_folder_gives(
    quick_demo: Path, cache_dir: Path, tmp_path: Path
) -> None:
    """The demo's plan applied to SmolLM2's GGUF (dequantised by transformers) and to the Hugging
    Face folder the demo made from it: the same tensors, the same layer configs."""
    from safetensors.torch import load_file

    from graphfuse.models import smollm2

    plan = quick_demo / "plan.json"
    outs = {"hf": quick_demo / "smollm2-hf", "gguf": cache_dir / smollm2.GGUF_NAME}
    for name, source in outs.items():
        ckpt = plans.apply(plan, source, tmp_path / name, to="nemotron-nas")
        assert ckpt.ffn_stages == 28 and sum(ckpt.attention) == 28
    a, b = (load_file(str(tmp_path / name / "model.safetensors")) for name in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads((tmp_path / name / "config.json").read_text()) for name in outs]
    assert configs[0]["block_configs"] == configs[1]["block_configs"]
    assert (tmp_path / "gguf" / "tokenizer.json").is_file()
