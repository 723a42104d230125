"""Models as onnxruntime-genai's model builder writes them: the ONNX LLMs people download.

    tiny_hf_folder("qwen2", dir, tokenizer_dir)   a small random Hugging Face model folder
    build(hf_dir, out_dir, "int4")                python -m onnxruntime_genai.models.builder

The builder reads a Hugging Face folder (config, safetensors, and tokenizer files: it calls
``AutoTokenizer.from_pretrained`` on it) and writes a folder with ``genai_config.json``, the
decoder model and its external data. At ``int4`` every projection is a ``MatMulNBits``; its
graphs fold each residual Add into the next ``SkipSimplifiedLayerNormalization`` and run attention
as ``GroupQueryAttention``. graphfuse's tests run it on small random models of several
architectures and on SmolLM2.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from graphfuse.errors import GraphfuseError

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiny_hf_folder(
    arch: str, folder: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides: Any
) -> Path:
    """A small random ``arch`` model saved as a Hugging Face folder with the tokenizer files of
    ``tokenizer_dir`` beside it. Norm gains are drawn around one, so gain folding shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    fields: dict[str, Any] = {
        "vocab_size": 49152,  # SmolLM2's tokenizer
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
    }
    if arch == "gemma":
        fields["head_dim"] = 16
    fields.update(overrides)
    config = AutoConfig.for_model(arch, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, folder / name)
    return folder


def save_tokenizer(tokenizer: Any, folder: Path) -> Path:
    """Write a Hugging Face tokenizer's files (e.g. SmolLM2's, loaded from its GGUF)."""
    tokenizer.save_pretrained(folder)
    return folder


def build(
    hf_dir: Path,
    out_dir: Path,
    precision: str = "int4",
    *,
    cache: Path | None = None,
    execution_provider: str = "cpu",
) -> Path:
    """Run onnxruntime-genai's model builder (for the CPU unless ``execution_provider`` says
    otherwise: its fp16 models exist only for GPUs, ``"cuda"``); returns ``out_dir``."""
    cache = cache or out_dir.with_name(out_dir.name + ".cache")
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir)]
    cmd += ["-o", str(out_dir), "-p", precision, "-e", execution_provider, "-c", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0 or not (out_dir / "genai_config.json").is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise GraphfuseError(f"onnxruntime-genai's builder failed on {hf_dir}: {tail[0]}")
    return out_dir


def generate(folder: Path, prompt: str | list[int], max_new_tokens: int = 8) -> list[int]:
    """Greedy continuation of ``prompt`` (text, or token ids) by onnxruntime-genai, as token
    ids."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    tokens = og.Tokenizer(model).encode(prompt) if isinstance(prompt, str) else prompt
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tokens) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(tokens) :]]
