"""A plan applied to a Hugging Face Llama checkpoint, written as a nemotron-nas checkpoint: the
format NVIDIA ships its FFN-fused models in, which vLLM (with tensor parallelism), TensorRT-LLM,
mlx-lm and llama.cpp read with no code of ours.

    source (Llama folder or GGUF) + plan  ─►  DIR/config.json            DeciLMForCausalLM,
                                              DIR/configuration_decilm.py  block_configs
                                              DIR/model.safetensors       (or shards + index)
                                              DIR/tokenizer files

Layer j of the source stays layer j (the layer count does not change):

    attention removed           block_configs[j].attention = {no_op: true}
    run first..last, layer first  one FFN of width ΣIᵢ padded to a multiple of 256:
                                    gate/up = concat_i W_i·diag(γᵢ)   (γᵢ folded along the input)
                                    down    = concat_i D_i, or the plan's refit
                                    post_attention_layernorm = ones
    layers first+1 … last       attention and FFN both {no_op: true}
    every other layer           as it was (its width padded to 256 as well)

Padding adds zero rows to gate/up and zero columns to down: silu(0)·0 = 0, so it is exact, and
every engine derives the same width from ``ffn_mult`` (``find_multiple(int(2·m·H/3), 256)``, as
vLLM's ``_ffn_mult_to_intermediate_size``). vLLM runs a layer as ``x += attn(norm₁(x))`` (skipped
for a no-op attention), then ``x += mlp(norm₂(x))``; a fused run is one such step, which is what
the fused ONNX graph computes.

Refused, with the reason: a plan made on another model (layer count, widths or norm-gain digest
differ), a run healed with a linear stand-in for attention (vLLM's reader has no such layer and
its FFN no bias), a source of another architecture, attention removed in layer 0 (vLLM starts the
residual stream there), and a width that ``ffn_mult`` cannot express.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from graphfuse.errors import GraphfuseError

if TYPE_CHECKING:
    import torch

    from graphfuse.plan import Plan, Source

PAD = 256  # every engine's find_multiple
DTYPES = ("float32", "bfloat16", "float16")
SHARD_BYTES = 4 << 30
CONFIG_MODULE = "configuration_decilm"
# Files of a Hugging Face folder that are not copied: the weights and config, which are rewritten.
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".safetensors.index.json")


@dataclass(frozen=True)
class Checkpoint:
    """What was written: per layer, whether attention runs and the FFN width (None: no-op)."""

    path: Path
    attention: tuple[bool, ...]
    widths: tuple[int | None, ...]
    ffn_stages_before: int

    @property
    def ffn_stages(self) -> int:
        return sum(w is not None for w in self.widths)


def width_of(ffn_mult: float, hidden: int) -> int:
    """The FFN width nemotron-nas readers derive from ``ffn_mult`` (vLLM, TensorRT-LLM, mlx-lm and
    llama.cpp all use this formula)."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % PAD == 0 else n + PAD - n % PAD


def ffn_mult(width: int, hidden: int) -> float:
    """The ``ffn_mult`` that every reader turns back into ``width``, or a refusal."""
    mult = 3 * width / (2 * hidden)
    if width <= 0 or width_of(mult, hidden) != width:
        raise GraphfuseError(
            f"an FFN width of {width} (hidden size {hidden}) cannot be expressed as a "
            f"nemotron-nas ffn_mult, which gives multiples of {PAD}: pad it to one"
        )
    return mult


def padded(width: int) -> int:
    return -(-width // PAD) * PAD


# -- the source ------------------------------------------------------------------------------------


@dataclass
class _Source:
    config: dict[str, Any]
    tensor: Callable[[str], torch.Tensor]  # by Hugging Face name, as stored
    shape: Callable[[str], list[int]]  # without reading the tensor
    copy_extras: Callable[[Path], None]  # tokenizer and generation files into the output


@contextmanager
def _open(source: Path) -> Iterator[_Source]:
    if source.is_file() and source.suffix == ".gguf":
        yield _from_gguf(source)
    elif source.is_dir() and (source / "config.json").is_file():
        with _from_folder(source) as opened:
            yield opened
    else:
        raise GraphfuseError(
            f"{source} is neither a Hugging Face model folder (config.json) nor a .gguf file: "
            "--to nemotron-nas reads the checkpoint the ONNX model was built from"
        )


@contextmanager
def _from_folder(folder: Path) -> Iterator[_Source]:
    from safetensors import safe_open

    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GraphfuseError(f"{folder / 'config.json'} is not JSON ({e})") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    elif (folder / "model.safetensors").is_file():
        weight_map = {}
    else:
        raise GraphfuseError(
            f"{folder} has no model.safetensors (or index): save the model with safetensors"
        )
    handles: dict[str, Any] = {}

    def handle(name: str) -> Any:
        file = weight_map.get(name, "model.safetensors")
        if file not in handles:
            handles[file] = safe_open(str(folder / file), framework="pt")
        return handles[file]

    def tensor(name: str) -> torch.Tensor:
        return handle(name).get_tensor(name)

    def shape(name: str) -> list[int]:
        return list(handle(name).get_slice(name).get_shape())

    def copy_extras(out: Path) -> None:
        for item in folder.iterdir():
            if (
                item.is_file()
                and item.name != "config.json"
                and not item.name.endswith(_NOT_COPIED)
            ):
                shutil.copy2(item, out / item.name)

    yield _Source(config, tensor, shape, copy_extras)
    handles.clear()


def _from_gguf(path: Path) -> _Source:
    """A GGUF read by transformers, dequantised to float32 (held in memory: GGUF files that
    transformers reads are small models)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (OSError, ValueError, KeyError) as e:
        raise GraphfuseError(f"transformers cannot read {path}: {e}") from None
    config = model.config.to_diff_dict()  # without the generic defaults to_dict adds
    config.pop("quantization_config", None)
    weights = model.state_dict()

    def copy_extras(out: Path) -> None:
        tokenizer.save_pretrained(out)

    return _Source(config, weights.__getitem__, lambda name: list(weights[name].shape), copy_extras)


# -- checks ----------------------------------------------------------------------------------------


def source_of(checkpoint: str | os.PathLike) -> Source:
    """The plan ``Source`` (shapes, norm-gain digest) of a Hugging Face Llama folder or GGUF: the
    same as that of its ONNX builds, so a plan can be made on the checkpoint directly."""
    path = Path(checkpoint)
    with _open(path) as src:
        return _source(src, str(path))


def _source(src: _Source, name: str) -> Source:
    import torch

    from graphfuse.plan import Source

    c = src.config
    arch = c.get("model_type")
    if arch != "llama" or (c.get("architectures") or ["LlamaForCausalLM"]) != ["LlamaForCausalLM"]:
        raise GraphfuseError(
            f"{name} is a '{arch}' model ({', '.join(c.get('architectures') or ['?'])}); "
            "--to nemotron-nas writes Llama checkpoints only"
        )
    if c.get("hidden_act", "silu") != "silu" or c.get("mlp_bias") or c.get("attention_bias"):
        raise GraphfuseError(
            f"{name} has a {c.get('hidden_act')} FFN or biases; nemotron-nas as graphfuse writes "
            "it holds SwiGLU layers without biases"
        )
    layers = int(c["num_hidden_layers"])
    digest = hashlib.sha256()
    widths = []
    for j in range(layers):
        gain = src.tensor(f"model.layers.{j}.post_attention_layernorm.weight")
        digest.update(gain.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
        widths.append(int(src.shape(f"model.layers.{j}.mlp.gate_proj.weight")[0]))
    return Source(layers, int(c["hidden_size"]), tuple(widths), digest.hexdigest()[:16])


def _check_plan(plan: Plan) -> None:
    removed = set(plan.attention_removed)
    if 0 in removed:
        raise GraphfuseError(
            "the plan removes the attention of layer 0, which nemotron-nas cannot express "
            "(vLLM starts the residual stream in layer 0's attention)"
        )
    for r in plan.runs:
        if r.heal not in ("none", "ffn"):
            raise GraphfuseError(
                f"run {r.first}-{r.last} is healed with '{r.heal}' (a linear stand-in for the "
                "removed attention), which nemotron-nas readers such as vLLM cannot express (no "
                "linear replacement layer, no FFN bias): make the plan with --heal ffn"
            )
        if kept := sorted(set(range(r.first + 1, r.last + 1)) - removed):
            raise GraphfuseError(
                f"run {r.first}-{r.last} spans layer {kept[0]}, whose attention the plan keeps: "
                "the plan is damaged"
            )


# -- writing ---------------------------------------------------------------------------------------


def write(
    plan: Plan,
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    dtype: str = "float32",
    progress: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Checkpoint:
    """Apply ``plan`` to ``source`` (a Hugging Face Llama folder or GGUF) and write a nemotron-nas
    checkpoint folder ``output`` (new; it appears complete or not at all)."""
    import torch
    from tqdm import tqdm

    from graphfuse.onnx_io import atomic_folder
    from graphfuse.plan import check_source

    if dtype not in DTYPES:
        raise GraphfuseError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    source, output = Path(source), Path(output)
    _check_plan(plan)
    with atomic_folder(output, [source]) as tmp, _open(source) as src:  # output checked first
        check_source(plan, _source(src, str(source)), str(source),
                     "the checkpoint the plan's model was built from")  # fmt: skip
        c = src.config
        hidden, layers = int(c["hidden_size"]), int(c["num_hidden_layers"])
        heads, kv_heads = int(c["num_attention_heads"]), int(c.get("num_key_value_heads") or c["num_attention_heads"])  # fmt: skip
        removed = set(plan.attention_removed)
        runs = {r.first: r for r in plan.runs}
        inner = {j for r in plan.runs for j in range(r.first + 1, r.last + 1)}
        out_dtype = getattr(torch, dtype)
        refits = plan.downs()
        shards = _Shards(tmp, shard_bytes)

        def put(name: str, t: torch.Tensor) -> None:
            shards.add(name, t.to(out_dtype).contiguous())

        put("model.embed_tokens.weight", src.tensor("model.embed_tokens.weight"))
        blocks, widths = [], []
        for j in tqdm(range(layers), desc="nemotron-nas", unit="layer", disable=not progress):
            p = f"model.layers.{j}."
            attention = j not in removed
            if attention:
                put(p + "input_layernorm.weight", src.tensor(p + "input_layernorm.weight"))
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    put(p + f"self_attn.{proj}.weight", src.tensor(p + f"self_attn.{proj}.weight"))
            if j in inner:
                width = None
            else:
                run = runs.get(j)
                members = range(j, run.last + 1) if run else range(j, j + 1)
                gate, up, down, gain = _ffn(src, members, refits.get((j, run.last)) if run else None)  # fmt: skip
                width = padded(gate.shape[0])
                pad = width - gate.shape[0]
                put(p + "mlp.gate_proj.weight", torch.nn.functional.pad(gate, (0, 0, 0, pad)))
                put(p + "mlp.up_proj.weight", torch.nn.functional.pad(up, (0, 0, 0, pad)))
                put(p + "mlp.down_proj.weight", torch.nn.functional.pad(down, (0, pad)))
                put(p + "post_attention_layernorm.weight", gain)
            widths.append(width)
            ffn: dict[str, Any] = {"no_op": True}
            if width is not None:
                ffn = {"no_op": False, "ffn_mult": ffn_mult(width, hidden)}
            attn: dict[str, Any] = {"no_op": True}
            if attention:
                attn = {"no_op": False, "n_heads_in_group": heads // kv_heads, "replace_with_linear": False}  # fmt: skip
            blocks.append({"attention": attn, "ffn": ffn})
        put("model.norm.weight", src.tensor("model.norm.weight"))
        if not c.get("tie_word_embeddings", False):
            put("lm_head.weight", src.tensor("lm_head.weight"))
        shards.finish()

        config = {k: v for k, v in c.items() if not k.startswith("_") and k not in ("transformers_version", "torch_dtype")}  # fmt: skip
        config.update(
            architectures=["DeciLMForCausalLM"],
            model_type="nemotron-nas",
            auto_map={"AutoConfig": f"{CONFIG_MODULE}.DeciLMConfig"},
            block_configs=blocks,
            dtype=dtype,
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.copy(Path(__file__).with_name(f"{CONFIG_MODULE}.py"), tmp / f"{CONFIG_MODULE}.py")
        src.copy_extras(tmp)
    return Checkpoint(output, tuple(b["attention"]["no_op"] is False for b in blocks),
                      tuple(widths), layers)  # fmt: skip


def _ffn(src: _Source, members: range, refit: Any) -> tuple[torch.Tensor, ...]:
    """(gate, up, down, norm gain) of one layer, or of a run's layers joined with their gains
    folded (then the gain is ones), in float32."""
    import torch

    def get(j: int, name: str) -> torch.Tensor:
        return src.tensor(f"model.layers.{j}.{name}").to(torch.float32)

    if len(members) == 1:
        j = members[0]
        return (get(j, "mlp.gate_proj.weight"), get(j, "mlp.up_proj.weight"),
                get(j, "mlp.down_proj.weight"), get(j, "post_attention_layernorm.weight"))  # fmt: skip
    gains = [get(j, "post_attention_layernorm.weight") for j in members]
    gate = torch.cat([get(j, "mlp.gate_proj.weight") * g for j, g in zip(members, gains, strict=True)])  # fmt: skip
    up = torch.cat([get(j, "mlp.up_proj.weight") * g for j, g in zip(members, gains, strict=True)])
    if refit is None:
        down = torch.cat([get(j, "mlp.down_proj.weight") for j in members], dim=1)
    else:  # the plan stores the MatMul's [ΣI, H]; a Linear holds [H, ΣI]
        down = torch.from_numpy(refit).to(torch.float32).T
    return gate, up, down, torch.ones_like(gains[0])


class _Shards:
    """safetensors files of at most ``limit`` bytes each (one tensor may exceed it), named as
    transformers names them; more than one gets an index."""

    def __init__(self, folder: Path, limit: int) -> None:
        self.folder, self.limit = folder, limit
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.names: list[list[str]] = []

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.size + nbytes > self.limit:
            self._flush()
        self.pending[name] = t
        self.size += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        n = len(self.names)
        save_file(self.pending, str(self.folder / f".shard-{n}"), metadata={"format": "pt"})
        self.names.append(list(self.pending))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending:
            self._flush()
        count = len(self.names)
        if count == 1:
            os.replace(self.folder / ".shard-0", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.names):
            file = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self.folder / f".shard-{i}", self.folder / file)
            weight_map.update(dict.fromkeys(names, file))
        index = {"metadata": {}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(
            json.dumps(index, indent=2) + "\n"
        )
