"""Session-cached torch exports, for tests that need real exporter output.

Each *flavour* names one export recipe from ``graphfuse.models`` (model config, dtype, exporter,
opset). ``torch_export(flavour)`` exports it once per test session into pytest's temporary
directory and returns the fp32 torch model (the reference) with the ONNX path. Exports take
seconds each, so tests using them are marked ``slow``.

Use from a test module with ``from _torch_fixtures import torch_export``; pytest then finds the
fixture in that module's namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from graphfuse.models.llama import BlockConfig, LlamaLike, LlamaLikeConfig, puzzle_like_config


@dataclass(frozen=True)
class Flavour:
    """How to build and export one model; `runs` are its maximal fusable runs of blocks (none
    for HF Llama, whose every layer keeps its attention)."""

    build: Callable[[], torch.nn.Module]
    export: Callable[[torch.nn.Module, Path], Path]
    dtype: str = "fp32"
    runs: tuple[tuple[int, int], ...] = ((1, 3), (4, 5))


@dataclass(frozen=True)
class Exported:
    flavour: str
    model: torch.nn.Module  # the fp32 torch model the export was made from
    path: Path
    dtype: str
    runs: tuple[tuple[int, int], ...]


def _llama(**config: object) -> Callable[[], torch.nn.Module]:
    return lambda: LlamaLike(puzzle_like_config(**config))


def _small(**config: object) -> Callable[[], torch.nn.Module]:
    """Three blocks (attention, none, none): one run (0, 2); half the export time of six."""
    on, off = BlockConfig(), BlockConfig(attention=False)
    return lambda: LlamaLike(LlamaLikeConfig(layers=3, blocks=(on, off, off), **config))


def _export(**options: object) -> Callable[[torch.nn.Module, Path], Path]:
    from graphfuse.models.llama import export_onnx

    return lambda model, path: export_onnx(model, path, **options)


def _hf(keep_ones: bool) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from graphfuse.models.hf_llama import tiny_llama

        return tiny_llama(keep_ones=keep_ones)

    return build


def _export_hf(model: torch.nn.Module, path: Path) -> Path:
    from graphfuse.models.hf_llama import export_hf_llama

    return export_hf_llama(model, path)


_SMALL_RUNS = ((0, 2),)  # the runs of _small() models

FLAVOURS: dict[str, Flavour] = {
    "dynamo_fp32": Flavour(_llama(), _export()),
    "dynamo_fp16": Flavour(_llama(), _export(dtype="fp16"), dtype="fp16"),
    "dynamo_bf16": Flavour(_llama(), _export(dtype="bf16"), dtype="bf16"),
    "legacy_fp32": Flavour(_llama(), _export(exporter="legacy")),
    "legacy_fp16": Flavour(_llama(), _export(exporter="legacy", dtype="fp16"), dtype="fp16"),
    "rms_norm_opset23": Flavour(_small(norm="functional"), _export(opset=23), runs=_SMALL_RUNS),
    "gelu": Flavour(_small(activation="gelu"), _export(), runs=_SMALL_RUNS),
    "gelu_opset20": Flavour(_small(activation="gelu"), _export(opset=20), runs=_SMALL_RUNS),
    "gelu_tanh": Flavour(_small(activation="gelu_tanh"), _export(), runs=_SMALL_RUNS),
    "bias": Flavour(_small(bias=True), _export(), runs=_SMALL_RUNS),
    "gate_first": Flavour(_small(gate_up="gate_first"), _export(), runs=_SMALL_RUNS),
    "up_first": Flavour(_small(gate_up="up_first"), _export(), runs=_SMALL_RUNS),
    "hf_fp32": Flavour(_hf(keep_ones=False), _export_hf, runs=()),
    "hf_fp32_ones": Flavour(_hf(keep_ones=True), _export_hf, runs=()),
}


@pytest.fixture(scope="session")
def torch_export(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Exported]:
    """``torch_export(flavour) -> Exported``, each flavour exported at most once per session."""
    directory = tmp_path_factory.mktemp("torch_exports")
    cache: dict[str, Exported] = {}

    def get(flavour: str) -> Exported:
        if flavour not in cache:
            recipe = FLAVOURS[flavour]
            model = recipe.build()
            path = recipe.export(model, directory / f"{flavour}.onnx")
            cache[flavour] = Exported(flavour, model, path, recipe.dtype, recipe.runs)
        return cache[flavour]

    return get
