"""Session-wide fixtures of the real model, SmolLM2-135M: one fetch, one load and one export of
each ONNX model per test session, shared by every test module that needs them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from graphfuse import text
from graphfuse.api import drop_attention_file
from graphfuse.cli import main
from graphfuse.models import genai_build, smollm2

# Small onnxruntime-genai builds (random weights, SmolLM2's tokenizer), one per (architecture,
# precision) and test session.
LAYERS = 6
DROPPED = "2-4"  # attention removed in layers 2, 3, 4: FFN blocks 1..4 form one run


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


@pytest.fixture(scope="session")
def tokenizer_dir(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return genai_build.save_tokenizer(
        smollm2.load_tokenizer(cache_dir), tmp_path_factory.mktemp("tokenizer")
    )


@pytest.fixture(scope="session")
def genai_folder(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One builder run per (architecture, precision), shared by the whole session."""
    built: dict[tuple[str, str], Path] = {}

    def get(arch: str, precision: str) -> Path:
        if (arch, precision) not in built:
            root = tmp_path_factory.mktemp(f"genai-{arch}")
            hf = genai_build.tiny_hf_folder(
                arch, root / "hf", tokenizer_dir, num_hidden_layers=LAYERS
            )
            built[(arch, precision)] = genai_build.build(hf, root / precision, precision)
        return built[(arch, precision)]

    return get


@pytest.fixture(scope="session")
def dropped(genai_folder, tmp_path_factory: pytest.TempPathFactory):
    made: dict[tuple[str, str], Path] = {}

    def get(arch: str, precision: str) -> Path:
        if (arch, precision) not in made:
            out = tmp_path_factory.mktemp("dropped") / f"{arch}-{precision}"
            drop_attention_file(genai_folder(arch, precision), out, DROPPED)
            made[(arch, precision)] = out
        return made[(arch, precision)]

    return get


@pytest.fixture(scope="session")
def quick_demo(cache_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`graphfuse demo --quick`, run once per session: its report, plan and model folders."""
    root = tmp_path_factory.mktemp("demo")
    out, cache = root / "demo", root / "cache"
    cache.mkdir()  # its own cache: the demo keeps its builds there
    shutil.copy(cache_dir / smollm2.GGUF_NAME, cache)
    assert main(["demo", "--quick", "--out", str(out), "--cache", str(cache)]) == 0
    return out
