"""onnxruntime-genai model folders: read the model a folder names, write a complete new folder.

A folder written by onnxruntime-genai's model builder holds ``genai_config.json``, the decoder
model it names (``model.decoder.filename``) with its external data, and tokenizer and processing
files. A pass on such a folder writes a new folder that ``onnxruntime_genai.Model`` loads:

- every file but the model and its data is copied;
- the model is written by the pass, its external data beside it;
- where layers lost their attention, their KV-cache inputs and outputs are gone, so the others
  are renumbered to stay contiguous (``past_key_values.%d.key`` for d = 0 … n−1, as the runtime
  allocates them) and ``num_hidden_layers`` becomes n, the layers that keep a cache.

The folder appears complete or not at all: it is built under a temporary name beside its final
one and renamed at the end.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import onnx

from graphfuse.errors import GraphfuseError
from graphfuse.onnx_io import atomic_folder

CONFIG = "genai_config.json"
CACHE_NAMES = ("past_key_names", "past_value_names")
PRESENT_NAMES = ("present_key_names", "present_value_names")

T = TypeVar("T")


def is_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir()


def read_config(folder: Path) -> dict:
    path = folder / CONFIG
    if not path.is_file():
        raise GraphfuseError(
            f"{folder}: a folder is read as an onnxruntime-genai model, but it has no {CONFIG}; "
            "pass the .onnx file itself, or a folder the model builder wrote"
        )
    try:
        config = json.loads(path.read_text())
        config["model"]["decoder"]["filename"]
    except (ValueError, KeyError, TypeError):
        raise GraphfuseError(
            f"{path}: not an onnxruntime-genai config (no model.decoder.filename); "
            "rebuild the folder with onnxruntime_genai.models.builder"
        ) from None
    return config


def model_file(folder: str | os.PathLike) -> Path:
    """The decoder model file that a folder's ``genai_config.json`` names."""
    folder = Path(folder)
    name = read_config(folder)["model"]["decoder"]["filename"]
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise GraphfuseError(f"{folder / CONFIG}: model file '{name}' is not inside the folder")
    if not path.is_file():
        raise GraphfuseError(
            f"{folder / CONFIG} names model file '{name}', which is missing from {folder}"
        )
    return path


def transform_folder(source: Path, output: Path, write: Callable[[Path, Path], T]) -> T:
    """Run ``write(model_in, model_out)`` into a new folder ``output`` made from ``source``."""
    model = model_file(source)
    config = read_config(source)
    with atomic_folder(output, [source]) as tmp:
        skip = {model.name, *_data_files(model)}
        for item in source.iterdir():
            if item.name in skip:
                continue
            if item.is_dir():
                shutil.copytree(item, tmp / item.name)
            else:
                shutil.copy2(item, tmp / item.name)
        result = write(model, tmp / model.name)
        _renumber_cache(tmp / model.name, config)
        (tmp / CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    return result


def _data_files(model: Path) -> set[str]:
    proto = onnx.load(str(model), load_external_data=False)
    return {
        onnx.external_data_helper.ExternalDataInfo(t).location
        for t in proto.graph.initializer
        if onnx.external_data_helper.uses_external_data(t)
    }


def _renumber_cache(path: Path, config: dict) -> None:
    """Make the KV-cache inputs and outputs contiguous again and set the layer count."""
    decoder = config["model"]["decoder"]
    patterns = [decoder["inputs"].get(k) for k in CACHE_NAMES]
    patterns += [decoder["outputs"].get(k) for k in PRESENT_NAMES]
    if not all(patterns):
        return
    proto = onnx.load(str(path), load_external_data=False)
    names = {v.name for v in (*proto.graph.input, *proto.graph.output)}
    layers = sorted({int(m.group(1)) for n in names if (m := re.fullmatch(_regex(patterns[0]), n))})
    rename = {
        pattern % old: pattern % new
        for new, old in enumerate(layers)
        for pattern in patterns
        if old != new
    }
    if rename:
        for value in (*proto.graph.input, *proto.graph.output, *proto.graph.value_info):
            value.name = rename.get(value.name, value.name)
        for node in proto.graph.node:
            node.input[:] = [rename.get(v, v) for v in node.input]
            node.output[:] = [rename.get(v, v) for v in node.output]
        from graphfuse.onnx_io import atomic_output

        with atomic_output(path) as tmp:  # names only: the data file stays as it is
            tmp.write_bytes(proto.SerializeToString())
    decoder["num_hidden_layers"] = len(layers)


def _regex(pattern: str) -> str:
    return re.escape(pattern).replace("%d", r"(\d+)")


def prefill_feeds(folder: Path, model: onnx.ModelProto, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Feeds for a prefill of ``ids`` [batch, seq] from an empty cache, as the runtime makes them:
    an all-ones attention mask and [batch, kv_heads, 0, head_size] past tensors; ``ids`` cut to
    the model's context length."""
    config = read_config(folder)["model"]
    decoder = config["decoder"]
    ids = np.asarray(ids, np.int64)[:, : config.get("context_length")]
    empty = np.zeros(
        (len(ids), decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32
    )
    feeds = {"input_ids": ids}
    names = {v.name for v in model.graph.input}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones_like(ids)
    patterns = [
        re.compile(_regex(decoder["inputs"][k])) for k in CACHE_NAMES if k in decoder["inputs"]
    ]
    feeds |= {n: empty for n in names if any(p.fullmatch(n) for p in patterns)}
    return feeds


def dims(folder: str | os.PathLike, model: onnx.ModelProto) -> dict[str, int]:
    """Sizes of the symbolic dimensions of the model's cache inputs ([batch, kv_heads, past,
    head_size]), from the folder's genai_config.json: what a session alone cannot tell."""
    decoder = read_config(Path(folder))["model"]["decoder"]
    sizes = {1: decoder["num_key_value_heads"], 3: decoder["head_size"]}
    out: dict[str, int] = {}
    for value in model.graph.input:
        shape = value.type.tensor_type.shape.dim
        if value.name.startswith("past") and len(shape) == 4:
            for axis, size in sizes.items():
                if shape[axis].dim_param:
                    out[shape[axis].dim_param] = size
    return out
