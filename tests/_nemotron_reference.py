"""An independent reading of a nemotron-nas checkpoint: transformers' own Llama, with each layer's
sublayers replaced as the checkpoint's ``block_configs`` say. A no-op sublayer returns zeros,
which leaves the residual stream as it was (transformers' decoder layer adds every sublayer's
output to it), and a layer's MLP takes the width its ``ffn_mult`` gives. That is how vLLM's
``DeciLMDecoderLayer`` runs the checkpoint, written with none of graphfuse's code."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


class _Zero(torch.nn.Module):
    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        zeros = torch.zeros_like(hidden_states)
        return zeros if not kwargs and not args else (zeros, None)


def load(folder: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = json.loads((folder / "config.json").read_text())
    blocks = config.pop("block_configs")
    for key in ("architectures", "model_type", "auto_map", "dtype"):
        config.pop(key, None)
    llama = LlamaConfig(**config)
    model = LlamaForCausalLM(llama).eval()
    for layer, block in zip(model.model.layers, blocks, strict=True):
        if block["attention"]["no_op"]:
            layer.self_attn = _Zero()
        if block["ffn"]["no_op"]:
            layer.mlp = _Zero()
        else:
            mult = block["ffn"]["ffn_mult"]
            width = int(2 * mult * llama.hidden_size / 3)
            width = -(-width // 256) * 256
            wide = LlamaConfig(**{**config, "intermediate_size": width})
            layer.mlp = LlamaMLP(wide)
    weights = {}
    for file in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(file)))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # Only the tied head and the norms of no-op sublayers may be absent.
    assert not unexpected, unexpected
    allowed = {"lm_head.weight"}
    for j, block in enumerate(blocks):
        if block["attention"]["no_op"]:
            allowed.add(f"model.layers.{j}.input_layernorm.weight")
        if block["ffn"]["no_op"]:
            allowed.add(f"model.layers.{j}.post_attention_layernorm.weight")
    assert set(missing) <= allowed, sorted(set(missing) - allowed)[:5]
    if llama.tie_word_embeddings:
        model.tie_weights()
    return model.float()


@torch.no_grad()
def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0]
