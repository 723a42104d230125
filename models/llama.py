"""A configurable Llama-style model: the torch fixture that graphfuse's tests export to ONNX.

Each block is pre-norm attention (optional) followed by a pre-norm gated FFN, as in the
``block_configs`` of NVIDIA's Puzzle-derived models, where some blocks have no attention and
runs of FFNs become consecutive. The variants the pattern matcher must accept are switches of
:class:`LlamaLikeConfig` (activation, biases, fused gate/up, RMSNorm form, dtype, exporter).

``LlamaLike.parallel_runs`` turns the forward pass into the *parallel reference* of FFN Fusion:
for a run (a, b), ``X_out = X + Σ_{i=a..b} FFN_i(norm_i(X))`` with X the residual after block
a's attention. A correctly fused ONNX graph equals this to float tolerance; the sequential
forward is what fusion approximates.

:func:`export_onnx` writes the logits graph with the dynamo or the legacy (TorchScript) exporter.
"""

from __future__ import annotations

import copy
import io
import itertools
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from graphfuse.errors import GraphfuseError

# onnx 1.23 writes IR 14 by default, newer than the runtimes users have read: every file
# written here is clamped (see graphfuse.export).
from graphfuse.export import MAX_IR_VERSION

_ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
_GATE_UP = ("separate", "gate_first", "up_first")
_NORMS = ("manual", "functional")
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

DType = Literal["fp32", "fp16", "bf16"]
Exporter = Literal["dynamo", "legacy"]


@dataclass(frozen=True)
class BlockConfig:
    """One block: whether it keeps attention, and its FFN width."""

    attention: bool = True
    intermediate: int | None = None  # FFN width; None -> LlamaLikeConfig.intermediate


@dataclass(frozen=True)
class LlamaLikeConfig:
    """Shape and variant switches of :class:`LlamaLike`."""

    vocab: int = 256
    hidden: int = 64
    intermediate: int = 128
    heads: int = 4
    kv_heads: int = 2
    layers: int = 6
    blocks: tuple[BlockConfig, ...] | None = None  # None -> `layers` blocks, all with attention
    eps: float = 1e-5
    activation: str = "silu"  # "silu" | "gelu" (erf) | "gelu_tanh"; GeGLU for the gelu ones
    bias: bool = False  # biases on the gate/up/down projections
    gate_up: str = "separate"  # "separate" | "gate_first" | "up_first" (one Linear, then chunk)
    norm: str = "manual"  # "manual" (HF LlamaRMSNorm in fp32) | "functional" (F.rms_norm)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r} is not one of {_ACTIVATIONS}")
        if self.gate_up not in _GATE_UP:
            raise ValueError(f"gate_up {self.gate_up!r} is not one of {_GATE_UP}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm {self.norm!r} is not one of {_NORMS}")
        if (
            self.hidden % self.heads
            or self.heads % self.kv_heads
            or (self.hidden // self.heads) % 2
        ):
            raise ValueError(
                f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads}: need "
                "hidden divisible by heads, heads by kv_heads, and an even head size (RoPE)"
            )
        if self.blocks is not None and len(self.blocks) != self.layers:
            raise ValueError(
                f"blocks has {len(self.blocks)} entries but layers={self.layers}; pass both"
            )

    @property
    def block_configs(self) -> tuple[BlockConfig, ...]:
        return self.blocks if self.blocks is not None else (BlockConfig(),) * self.layers

    def width(self, block: int) -> int:
        """FFN width of block `block`."""
        own = self.block_configs[block].intermediate
        return self.intermediate if own is None else own


def puzzle_like_config(**overrides: object) -> LlamaLikeConfig:
    """Six blocks shaped like a Puzzle model after attention removal (A: attention, -: none):

        block   0  1  2  3   4  5
        attn    A  A  -  -   A  -
        width   .  .  .  96  .  .     (. = config.intermediate)

    Two fusable runs, (1, 3) with mixed FFN widths and (4, 5). Keyword arguments override any
    other :class:`LlamaLikeConfig` field.
    """
    on, off = BlockConfig(), BlockConfig(attention=False)
    blocks = (on, on, off, BlockConfig(attention=False, intermediate=96), on, off)
    return LlamaLikeConfig(**{"layers": len(blocks), "blocks": blocks, **overrides})  # type: ignore[arg-type]


class RMSNorm(nn.Module):
    """RMSNorm in the two forms exporters see: HF's hand-written one, or ``F.rms_norm``."""

    def __init__(self, hidden: int, eps: float, form: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "functional":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Exactly HF LlamaRMSNorm: statistics in fp32, cast back, *then* the gain in x's dtype,
        # so fp16/bf16 exports carry the Cast island the matcher has to see through.
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedFFN(nn.Module):
    """``down(act(gate(z)) * up(z))``; gate and up are separate Linears or one fused Linear."""

    def __init__(self, hidden: int, width: int, config: LlamaLikeConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.gate_up = config.gate_up
        if config.gate_up == "separate":
            self.gate_proj = nn.Linear(hidden, width, bias=config.bias)
            self.up_proj = nn.Linear(hidden, width, bias=config.bias)
        else:
            # Phi-3 style: one [2*width, hidden] Linear whose output is chunked in two halves.
            self.gate_up_proj = nn.Linear(hidden, 2 * width, bias=config.bias)
        self.down_proj = nn.Linear(width, hidden, bias=config.bias)

    def gate_and_up(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gate_up == "separate":
            return self.gate_proj(z), self.up_proj(z)
        first, second = self.gate_up_proj(z).chunk(2, dim=-1)
        return (first, second) if self.gate_up == "gate_first" else (second, first)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_and_up(z)
        if self.activation == "silu":
            act = F.silu(gate)
        else:
            act = F.gelu(gate, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.down_proj(act * up)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


class Attention(nn.Module):
    """Causal grouped-query attention with rotary position embeddings (HF Llama layout)."""

    def __init__(self, config: LlamaLikeConfig) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.heads, config.kv_heads
        self.head_dim = config.hidden // config.heads
        self.q_proj = nn.Linear(config.hidden, config.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden, config.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden, config.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads * self.head_dim, config.hidden, bias=False)
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, self.head_dim, 2) / self.head_dim)
        self.inv_freq: torch.Tensor
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.kv_heads, self.head_dim).transpose(1, 2)
        angles = torch.arange(seq, device=x.device, dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # Repeat the kv heads by view/expand (HF repeat_kv): both exporters handle it, unlike
        # SDPA's enable_gqa.
        groups = self.heads // self.kv_heads
        k = k[:, :, None].expand(batch, self.kv_heads, groups, seq, self.head_dim)
        v = v[:, :, None].expand(batch, self.kv_heads, groups, seq, self.head_dim)
        k = k.reshape(batch, self.heads, seq, self.head_dim)
        v = v.reshape(batch, self.heads, seq, self.head_dim)
        # Explicit softmax attention like HF's eager path (softmax in fp32, then back), rather
        # than SDPA: the legacy exporter runs fp16 SDPA in fp32 and leaks fp32 into the
        # residual stream, which would hide the plain fp16 graph we want as a fixture.
        scores = (q @ k.transpose(-1, -2)) * self.head_dim**-0.5
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        out = scores.to(torch.float32).softmax(dim=-1).to(q.dtype) @ v
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm block: ``x += attn(attn_norm(x))`` if it has attention, then the FFN step."""

    def __init__(self, config: LlamaLikeConfig, index: int) -> None:
        super().__init__()
        self.has_attention = config.block_configs[index].attention
        if self.has_attention:
            self.attn_norm = RMSNorm(config.hidden, config.eps, config.norm)
            self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.hidden, config.eps, config.norm)
        self.ffn = GatedFFN(config.hidden, config.width(index), config)

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.attn_norm(x)) if self.has_attention else x

    def ffn_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The block's FFN contribution ``FFN(norm(x))``, without the residual."""
        return self.ffn(self.ffn_norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attend(x)
        return x + self.ffn_delta(x)


class LlamaLike(nn.Module):
    """``forward(input_ids [batch, seq] int64) -> logits [batch, seq, vocab]``."""

    def __init__(self, config: LlamaLikeConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.hidden)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(len(config.block_configs)))
        self.norm = RMSNorm(config.hidden, config.eps, config.norm)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        self._parallel_runs: tuple[tuple[int, int], ...] = ()
        _init_weights(self, config.seed)
        self.eval()

    def block(self, index: int) -> Block:
        """Block `index`, typed (``self.blocks[index]`` is only an ``nn.Module`` to mypy)."""
        block = self.blocks[index]
        assert isinstance(block, Block)
        return block

    @property
    def parallel_runs(self) -> tuple[tuple[int, int], ...]:
        """Runs (a, b), inclusive, whose FFNs the forward computes in parallel (see module doc).

        Set it to any sequence of pairs; it is validated and stored as a tuple, so that it
        cannot be changed in place behind the validation.
        """
        return self._parallel_runs

    @parallel_runs.setter
    def parallel_runs(self, runs: Iterable[tuple[int, int]]) -> None:
        runs = tuple((int(a), int(b)) for a, b in runs)
        for run in runs:
            check_run(self, run)
        ordered = sorted(runs)
        for (_, b), (c, d) in itertools.pairwise(ordered):
            if c <= b:
                raise ValueError(f"parallel runs {ordered} overlap at ({c}, {d})")
        self._parallel_runs = tuple(ordered)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        run_end = dict(self._parallel_runs)
        i = 0
        while i < len(self.blocks):
            if i in run_end:
                x = _parallel_run(self, (i, run_end[i]), self.block(i).attend(x))
                i = run_end[i] + 1
            else:
                x = self.block(i)(x)
                i += 1
        return self.lm_head(self.norm(x))


def _init_weights(model: LlamaLike, seed: int) -> None:
    """Seeded, non-trivial values: gains near 1 (not 1) and non-zero biases, so that folding the
    gains into the weights and concatenating or summing biases are really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                param.copy_(0.02 * noise)
            elif name == "embed.weight":
                param.copy_(noise)
            else:  # Linear [out, in]: keep the residual stream's scale roughly constant
                param.copy_(noise / math.sqrt(param.shape[1]))


def check_run(model: LlamaLike, run: tuple[int, int]) -> None:
    """Raise ValueError unless `run` = (a, b) is a fusable run of `model`'s blocks."""
    a, b = run
    n = len(model.blocks)
    if not 0 <= a < b < n:
        raise ValueError(f"run {run}: need 0 <= a < b < {n} (a run has at least two blocks)")
    with_attention = [i for i in range(a + 1, b + 1) if model.block(i).has_attention]
    if with_attention:
        raise ValueError(
            f"run {run}: blocks {with_attention} have attention; only block a={a} may have it"
        )


def _parallel_run(model: LlamaLike, run: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    a, b = run
    total = model.block(a).ffn_delta(x)
    for i in range(a + 1, b + 1):
        total = total + model.block(i).ffn_delta(x)  # every branch reads the run's input x
    return x + total


def ffn_parallel_reference(model: LlamaLike, run: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
    """``x + Σ_{i=a..b} FFN_i(norm_i(x))`` for a residual-stream tensor x [..., hidden]."""
    check_run(model, run)
    with torch.no_grad():
        return _parallel_run(model, run, x)


@dataclass(frozen=True)
class FfnWeights:
    """One block's FFN parameters in torch Linear layout ([out, in]), gate and up split apart
    even when the model fuses them, so tests can compare against the ONNX initializers."""

    norm_gain: torch.Tensor  # [hidden]
    gate: torch.Tensor  # [width, hidden]
    up: torch.Tensor  # [width, hidden]
    down: torch.Tensor  # [hidden, width]
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    down_bias: torch.Tensor | None
    eps: float


def block_parameters(model: LlamaLike, block: int) -> dict[str, torch.Tensor]:
    """Block `block`'s parameters by their names inside the block (``"ffn.down_proj.weight"``);
    prefix ``f"blocks.{block}."`` gives the state-dict name, which the dynamo exporter keeps as
    the ONNX initializer name."""
    return {name: p.detach() for name, p in model.block(block).named_parameters()}


def ffn_weights(model: LlamaLike, block: int) -> FfnWeights:
    """Block `block`'s FFN parameters, gate and up split apart (see :class:`FfnWeights`)."""
    blk = model.block(block)
    ffn = blk.ffn
    gate_bias: torch.Tensor | None
    up_bias: torch.Tensor | None
    if ffn.gate_up == "separate":
        gate, up = ffn.gate_proj.weight, ffn.up_proj.weight
        gate_bias, up_bias = ffn.gate_proj.bias, ffn.up_proj.bias
    else:
        # The fused Linear's output rows are [first chunk; second chunk] (see GatedFFN).
        g, u = (0, 1) if ffn.gate_up == "gate_first" else (1, 0)
        rows = ffn.gate_up_proj.weight.chunk(2)
        gate, up = rows[g], rows[u]
        bias = ffn.gate_up_proj.bias
        gate_bias, up_bias = (None, None) if bias is None else (bias.chunk(2)[g], bias.chunk(2)[u])

    def detached(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach()

    return FfnWeights(
        norm_gain=blk.ffn_norm.weight.detach(),
        gate=gate.detach(),
        up=up.detach(),
        down=ffn.down_proj.weight.detach(),
        gate_bias=detached(gate_bias),
        up_bias=detached(up_bias),
        down_bias=detached(ffn.down_proj.bias),
        eps=blk.ffn_norm.eps,
    )


def example_input_ids(vocab: int, batch: int = 1, seq: int = 8, seed: int = 0) -> torch.Tensor:
    """Seeded token ids [batch, seq] int64."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator, dtype=torch.int64)


def export_onnx(
    model: LlamaLike,
    path: str | os.PathLike[str],
    *,
    dtype: DType = "fp32",
    exporter: Exporter = "dynamo",
    batch: int = 1,
    seq: int = 8,
    opset: int | None = 18,
) -> Path:
    """Export `model`'s logits to ONNX at `path` (see :func:`export_logits_onnx`)."""
    return export_logits_onnx(
        model,
        path,
        vocab=model.config.vocab,
        dtype=dtype,
        exporter=exporter,
        batch=batch,
        seq=seq,
        opset=opset,
    )


def export_logits_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    vocab: int,
    dtype: DType = "fp32",
    exporter: Exporter = "dynamo",
    batch: int = 1,
    seq: int = 8,
    opset: int | None = 18,
) -> Path:
    """Export any ``forward(input_ids) -> logits`` module: input ``input_ids`` int64
    [batch, seq], output ``logits``, both with dynamic batch and seq axes.

    A copy of `model` is cast to `dtype`, so the caller's model is left as it was. The file is
    written atomically (a temporary file beside it, then renamed) with its IR version clamped
    to :data:`MAX_IR_VERSION`. ``opset=None`` takes the exporter's default.
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {tuple(_DTYPES)}")
    if exporter not in ("dynamo", "legacy"):
        raise ValueError(f"exporter {exporter!r} is not 'dynamo' or 'legacy'")
    path = Path(path)
    module = copy.deepcopy(model).to(_DTYPES[dtype]).eval()
    input_ids = example_input_ids(vocab, batch, seq)
    with torch.no_grad():
        if exporter == "dynamo":
            proto = _export_dynamo(module, input_ids, opset)
        else:
            proto = _export_legacy(module, input_ids, opset)
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _export_dynamo(
    module: nn.Module, input_ids: torch.Tensor, opset: int | None
) -> onnx.ModelProto:
    # Dims given by name: torch.onnx makes them Dim.DYNAMIC, which (unlike torch.export.Dim)
    # tolerates the size-1 example batch, and names the ONNX dims "batch" and "seq".
    from graphfuse.export import export_module

    dynamic = {"input_ids": {0: "batch", 1: "seq"}}
    return export_module(
        module,
        (input_ids,),
        input_names=["input_ids"],
        output_names=["logits"],
        dynamic_shapes=dynamic,
        opset=opset,
    )


def _export_legacy(
    module: nn.Module, input_ids: torch.Tensor, opset: int | None
) -> onnx.ModelProto:
    buffer = io.BytesIO()
    try:
        torch.onnx.export(
            module,
            (input_ids,),
            buffer,  # type: ignore[arg-type]  # a BytesIO works; torch's annotation is narrower
            dynamo=False,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
            opset_version=opset,
        )
    except torch.onnx.OnnxExporterError as error:
        # E.g. transformers 5 Llama: "Exporting the operator 'aten::diff' ... is not supported".
        # The TorchScript exporter is deprecated (torch >= 2.9) and will not learn new ops.
        reason = str(error).strip().splitlines()[0]
        raise GraphfuseError(
            f"the legacy TorchScript exporter cannot export {type(module).__name__}: {reason}; "
            "this is a limitation of torch's deprecated exporter, use exporter='dynamo'"
        ) from error
    return onnx.load_from_string(buffer.getvalue())


__all__ = [
    "MAX_IR_VERSION",
    "BlockConfig",
    "FfnWeights",
    "LlamaLike",
    "LlamaLikeConfig",
    "block_parameters",
    "check_run",
    "example_input_ids",
    "export_logits_onnx",
    "export_onnx",
    "ffn_parallel_reference",
    "ffn_weights",
    "puzzle_like_config",
]
