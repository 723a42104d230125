"""Session-wide fixtures of the real model, SmolLM2-135M: one fetch, one load and one export of
each ONNX model per test session, shared by every test module that needs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from graphfuse import text
from graphfuse.models import smollm2


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private cache holding the verified GGUF; copied from the user's cache when present."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    cached = smollm2.default_cache_dir() / smollm2.GGUF_NAME
    if cached.is_file():
        shutil.copy(cached, cache / smollm2.GGUF_NAME)  # fetch() below still verifies it
    smollm2.fetch(cache)
    return cache


@pytest.fixture(scope="session")
def model_and_tokenizer(cache_dir: Path):
    return smollm2.load(cache_dir)


@pytest.fixture(scope="session")
def logits_onnx(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2.export_logits(tmp_path_factory.mktemp("export") / "logits.onnx", cache_dir)


@pytest.fixture(scope="session")
def decoder_onnx(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return smollm2.export_decoder(tmp_path_factory.mktemp("export") / "decoder.onnx", cache_dir)


@pytest.fixture(scope="session")
def windows(model_and_tokenizer) -> text.TokenWindows:
    return text.make_windows(model_and_tokenizer[1])
