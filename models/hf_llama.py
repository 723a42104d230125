"""A tiny Hugging Face ``LlamaForCausalLM`` with random weights, exported to ONNX: the fixture
for "what a real transformers model looks like after the dynamo exporter".

The RMSNorm gains of a freshly initialised HF model are all ones, and the exporter merges
identical initializers, so every norm would share one tensor. :func:`tiny_llama` randomises
them by default (so that gain folding is exercised) and keeps them with ``keep_ones=True``
(so that the shared-initializer case is exercised).

With transformers 5, the legacy TorchScript exporter fails on ``aten::diff`` for Llama; only the
dynamo exporter is offered here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from graphfuse.models.llama import DType, export_logits_onnx

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama_config(**overrides: Any) -> LlamaConfig:
    """A small ``LlamaConfig``: hidden 64, intermediate 128, 4 layers, 4 heads, 2 kv heads,
    vocab 256; keyword arguments override any ``LlamaConfig`` field."""
    from transformers import LlamaConfig

    fields: dict[str, Any] = {
        "vocab_size": 256,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        # Logits only: no KV cache inputs or outputs in the exported graph.
        "use_cache": False,
    }
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_llama(*, seed: int = 0, keep_ones: bool = False, **overrides: Any) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` (eval mode, fp32) with seeded random weights.

    Norm gains become ``1 + 0.1 * randn`` unless `keep_ones`; `overrides` go to
    :func:`tiny_llama_config`.
    """
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(**overrides))
    if not keep_ones:
        generator = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def export_hf_llama(
    model: LlamaForCausalLM,
    path: str | os.PathLike[str],
    *,
    dtype: DType = "fp32",
    batch: int = 2,
    seq: int = 8,
    opset: int | None = 18,
) -> Path:
    """Export `model`'s logits with the dynamo exporter (input ``input_ids`` [batch, seq]).

    The default example batch is 2, not 1: HF's mask code lets torch.export specialise a
    size-1 batch, which yields a graph that fails at any other batch size.
    """
    if getattr(model.config, "use_cache", False):
        # A cache would add past_key_values outputs; refuse rather than export a different graph.
        raise ValueError("export_hf_llama needs config.use_cache=False (logits-only graph)")
    return export_logits_onnx(
        model,
        path,
        vocab=model.config.vocab_size,
        dtype=dtype,
        exporter="dynamo",
        batch=batch,
        seq=seq,
        opset=opset,
    )


def hf_logits(model: LlamaForCausalLM, input_ids: torch.Tensor) -> torch.Tensor:
    """Reference logits of `model` for `input_ids`, computed without gradients."""
    with torch.no_grad():
        return model(input_ids=input_ids).logits


__all__ = ["export_hf_llama", "hf_logits", "tiny_llama", "tiny_llama_config"]
