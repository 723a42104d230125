"""graphfuse.text: the stdlib corpus, the users' token files, and the disjoint window split."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from graphfuse import text
from graphfuse.errors import GraphfuseError
from graphfuse.models import smollm2

# --- split_tokens: pure numpy ---------------------------------------------------------------


def _window_starts(windows: np.ndarray) -> set[int]:
    """With tokens = arange, a window is identified by its first token."""
    return set(windows[:, 0].tolist())


def test_split_is_disjoint_windows_of_the_stream() -> None:
    tokens = np.arange(10_000)
    w = text.split_tokens(tokens, seq_len=100, evaluation=3, validation=5, calibration=7)
    assert (w.evaluation.shape, w.validation.shape, w.calibration.shape) == (
        (3, 100),
        (5, 100),
        (7, 100),
    )
    assert w.seq_len == 100
    for part in (w.evaluation, w.validation, w.calibration):
        assert part.dtype == np.int64
        # each window is a contiguous slice of the stream, starting on a window boundary
        np.testing.assert_array_equal(
            part - part[:, :1], np.broadcast_to(np.arange(100), part.shape)
        )
        assert all(start % 100 == 0 for start in part[:, 0])
        assert list(part[:, 0]) == sorted(part[:, 0])  # kept in stream order
    starts = [_window_starts(p) for p in (w.evaluation, w.validation, w.calibration)]
    assert sum(map(len, starts)) == len(set().union(*starts)) == 15


def test_split_is_deterministic_and_calibration_size_leaves_evaluation_alone() -> None:
    tokens = np.arange(50_000)
    a = text.split_tokens(tokens, seq_len=64, calibration=8)
    b = text.split_tokens(tokens, seq_len=64, calibration=8)
    more = text.split_tokens(tokens, seq_len=64, calibration=None)
    other_seed = text.split_tokens(tokens, seq_len=64, calibration=8, seed=1)
    np.testing.assert_array_equal(a.calibration, b.calibration)
    np.testing.assert_array_equal(a.evaluation, more.evaluation)
    np.testing.assert_array_equal(a.validation, more.validation)
    assert len(more.calibration) == 50_000 // 64 - 8
    assert _window_starts(a.calibration) <= _window_starts(more.calibration)
    assert _window_starts(a.evaluation) != _window_starts(other_seed.evaluation)


def test_split_refuses_too_few_tokens_with_the_counts() -> None:
    with pytest.raises(GraphfuseError, match=r"1000 tokens make 1 windows of 512, fewer than"):
        text.split_tokens(np.arange(1000), seq_len=512)
    with pytest.raises(GraphfuseError, match="at least 2 tokens"):
        text.split_tokens(np.arange(1000), seq_len=1)


# --- token files -----------------------------------------------------------------------------


def test_load_tokens_reads_npy_and_ids_in_order(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.array([[5, 6], [7, 8]], dtype=np.int32))
    (tmp_path / "b.ids").write_text("1 2\n3\t4\n")
    tokens = text.load_tokens([tmp_path / "a.npy", tmp_path / "b.ids"])
    assert tokens.dtype == np.int64
    assert tokens.tolist() == [5, 6, 7, 8, 1, 2, 3, 4]
    assert text.load_tokens(str(tmp_path / "b.ids")).tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("floats.npy", np.zeros(3, dtype=np.float32), "not integer token ids"),
        ("words.ids", "1 2 three", "not whitespace-separated integer ids"),
        ("notes.txt", "some text", "needs a tokenizer"),
        ("missing.ids", None, "does not exist"),
    ],
)
def test_load_tokens_says_why_a_file_is_refused(
    tmp_path: Path, name: str, content: object, reason: str
) -> None:
    path = tmp_path / name
    if isinstance(content, np.ndarray):
        np.save(path, content)
    elif isinstance(content, str):
        path.write_text(content)
    with pytest.raises(GraphfuseError, match=reason):
        text.load_tokens(path)
    with pytest.raises(GraphfuseError, match="no token files"):
        text.load_tokens([])


# --- the stdlib corpus -----------------------------------------------------------------------


def test_stdlib_docstrings_are_deterministic_distinct_and_plenty() -> None:
    docs = text.stdlib_docstrings()
    assert docs == text.stdlib_docstrings.__wrapped__()  # recomputed, not cached
    assert len(set(docs)) == len(docs)
    assert all(d == d.strip() and d for d in docs)
    # ~1.8 M characters on Python 3.11; far more than the ~40k tokens the splits need.
    assert len(text.stdlib_corpus()) > 500_000
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in docs)  # json's


# --- with the real tokenizer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """SmolLM2's tokenizer, from a private cache (copied from the user's cache when present)."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    cached = smollm2.default_cache_dir() / smollm2.GGUF_NAME
    if cached.is_file():
        shutil.copy(cached, cache / smollm2.GGUF_NAME)  # fetch() still verifies the checksum
    return smollm2.load_tokenizer(cache)


@pytest.mark.slow
def test_default_windows_from_stdlib_text(tokenizer) -> None:
    tokens = text.tokenize(text.stdlib_corpus(), tokenizer)
    assert tokens.dtype == np.int64
    assert len(tokens) > 40_000
    w = text.make_windows(tokenizer)
    assert (w.evaluation.shape, w.validation.shape, w.calibration.shape) == (
        (4, 512),
        (4, 512),
        (16, 512),
    )
    np.testing.assert_array_equal(w.evaluation, text.split_tokens(tokens).evaluation)
    decoded = tokenizer.decode(w.evaluation[0].tolist())
    assert len(decoded) > 1000  # real prose: ~3-4 characters a token


@pytest.mark.slow
def test_text_file_is_tokenised_and_ids_are_checked_against_the_vocabulary(
    tmp_path: Path, tokenizer
) -> None:
    (tmp_path / "mine.txt").write_text("Return the number of items in a container.\n")
    tokens = text.load_tokens(tmp_path / "mine.txt", tokenizer)
    assert tokenizer.decode(tokens.tolist()) == "Return the number of items in a container.\n"
    (tmp_path / "foreign.ids").write_text(f"1 2 {len(tokenizer)}")
    with pytest.raises(GraphfuseError, match="made with another tokenizer"):
        text.load_tokens(tmp_path / "foreign.ids", tokenizer)
