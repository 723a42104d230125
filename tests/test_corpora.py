"""graphfuse.corpora: three named, disjoint text sets read from this machine, and their windows."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from graphfuse import corpora
from graphfuse.errors import GraphfuseError
from graphfuse.models import smollm2

# The machine sources, cached per process; cleared to read the machine afresh.
_CACHED = (
    corpora.vim_manual,
    corpora.python_reference,
    corpora.gnu_info_manuals,
    corpora.doc_prose,
    corpora.licence_texts,
    corpora._text_sets,
)

# Least sizes, in characters, of ~100k, 20k and 20k SmolLM2 tokens (~3.8 characters a token).
_MIN_CHARS = {"calibration": 400_000, "validation": 80_000, "test": 80_000}


def _clear_caches() -> None:
    for f in _CACHED:
        f.cache_clear()


def _keys(text_set: corpora.TextSet) -> list[str]:
    return [corpora.paragraph_key(p) for p in text_set.paragraphs()]


class CharTokenizer:
    """One token per character (its code point): a window decodes back to its exact text."""

    def __call__(self, text: str, **kwargs: Any) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def _decode(row: np.ndarray) -> str:
    return "".join(map(chr, row.tolist()))


@pytest.fixture(scope="module")
def sets() -> dict[str, corpora.TextSet]:
    return corpora.text_sets()


# --- the sets ---------------------------------------------------------------------------------


def test_three_named_sets_large_enough_with_sources_and_digests(sets) -> None:
    assert list(sets) == ["calibration", "validation", "test"]
    for name, s in sets.items():
        assert s.name == name
        assert s.chars == len(s.text) >= _MIN_CHARS[name], (name, s.chars)
        assert s.documents > 0 and s.sources
        assert s.digest == hashlib.sha256(s.text.encode()).hexdigest()[:12]
        assert s.text == s.text.strip() and "\n\n\n" not in s.text
        assert s.digest in s.describe() and name in s.describe()
    assert any("docstrings" in src for src in sets["calibration"].sources)
    assert any("/usr/share/doc" in src for src in sets["calibration"].sources)
    # the test set is one source, which no other set reads
    assert len(sets["test"].sources) == 1
    test_source = sets["test"].sources[0].split(":")[0]
    assert not any(
        src.startswith(test_source)
        for n in ("calibration", "validation")
        for src in sets[n].sources
    )


def test_sets_are_disjoint_at_paragraph_level_and_each_paragraph_appears_once(sets) -> None:
    keys = {name: _keys(s) for name, s in sets.items()}
    for name, k in keys.items():
        assert all(k), name  # no paragraph without words
        assert len(set(k)) == len(k), name  # licence texts and the like once
    assert not set(keys["test"]) & (set(keys["calibration"]) | set(keys["validation"]))
    assert not set(keys["validation"]) & set(keys["calibration"])


def test_sets_are_deterministic_when_the_machine_is_read_again(sets) -> None:
    assert corpora.text_sets() == sets  # cached
    _clear_caches()
    again = corpora.text_sets()  # and cached again, for the tests after this one
    assert {n: s.digest for n, s in again.items()} == {n: s.digest for n, s in sets.items()}
    assert again == sets


def test_machine_prose_is_sentences_not_code() -> None:
    assert corpora._is_prose("The editor behaves differently, depending on which mode you are in.")
    assert not corpora._is_prose("for (i = 0; i < n; i++) { x[i] = f(y[i], z[i]) + 1; }")
    assert not corpora._is_prose("| name | type | default | description | since | notes | flags |")
    assert not corpora._is_prose("Dieses Programm ist freie Software und steht unter der Lizenz.")
    vim = corpora._clean_vim_help(
        "*02.1*\tRunning |vim|\n\nTo start Vim, enter this command: >\n\n\tgvim file.txt\n\n"
        "In UNIX you can type this.\n"
    )
    assert vim.split() == [
        *("Running", "vim", "To", "start", "Vim,", "enter", "this", "command:"),
        *("In", "UNIX", "you", "can", "type", "this."),
    ]
    dep5 = corpora._unfold_dep5("Files: *\nLicense: MIT\n Permission is granted.\n .\n The end.\n")
    assert corpora.paragraphs(dep5) == ["Permission is granted.", "The end."]


# --- the user's calibration files -------------------------------------------------------------


def test_calib_files_join_the_calibration_set_only(sets, tmp_path: Path) -> None:
    mine = "A paragraph of my own that no machine holds, about quince jam and kites.\n"
    stolen = sets["test"].paragraphs()[3]
    path = tmp_path / "mine.txt"
    path.write_text(f"{mine}\n{stolen}\n")
    with_mine = corpora.text_sets([path])
    assert with_mine["calibration"].text.endswith(mine.strip())  # appended, the test text dropped
    assert with_mine["calibration"].documents == sets["calibration"].documents + 1
    assert any(str(path) in src for src in with_mine["calibration"].sources)
    for name in ("validation", "test"):
        assert with_mine[name].digest == sets[name].digest
    assert corpora.text_sets([str(path)]) == with_mine


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b" \n\n\t\n", "is empty"),
        ("nul.txt", b"some text\x00\x01\x02 more", "binary, not text"),
        ("latin1.txt", "café crème".encode("latin-1"), "is not UTF-8 text"),
        ("ids.npy", b"", "holds token ids"),
        ("missing.txt", None, "does not exist"),
    ],
)
def test_bad_calib_files_are_refused_in_one_line(
    tmp_path: Path, name: str, content: bytes | None, reason: str
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(GraphfuseError, match=reason) as info:
        corpora.text_sets([path])
    assert "\n" not in str(info.value) and str(path) in str(info.value)


# --- windows, with a tokenizer of one token per character ---------------------------------------


def test_windows_are_spread_disjoint_stretches_of_each_set(sets) -> None:
    counts = {"calibration": 12, "validation": 5, "test": 5}
    w = corpora.windows(CharTokenizer(), sets, seq_len=300, counts=counts, seed=3)
    assert list(w) == list(counts)
    for name, n in counts.items():
        assert w[name].shape == (n, 300) and w[name].dtype == np.int64
        text = sets[name].text
        starts = [text.find(_decode(row)) for row in w[name]]
        assert all(s >= 0 for s in starts)  # each window is a stretch of its set's text
        for k, s in enumerate(starts):  # window k lies inside the k-th of n equal stretches
            assert k * len(text) / n - 1 <= s and s + 300 <= (k + 1) * len(text) / n + 1
        assert all(s == 0 or text[s - 2 : s] == "\n\n" for s in starts)  # at paragraph starts
    again = corpora.windows(CharTokenizer(), sets, seq_len=300, counts=counts, seed=3)
    other = corpora.windows(CharTokenizer(), sets, seq_len=300, counts=counts, seed=4)
    for name in counts:
        np.testing.assert_array_equal(w[name], again[name])
        assert not np.array_equal(w[name], other[name])
    rows = [tuple(r) for a in w.values() for r in a.tolist()]
    assert len(set(rows)) == len(rows)


def test_windows_refuse_what_a_set_cannot_give(sets) -> None:
    tok = CharTokenizer()
    assert corpora.windows(tok, sets, seq_len=64, counts={"test": 0})["test"].shape == (0, 64)
    with pytest.raises(GraphfuseError, match="too few for 100 windows"):
        corpora.windows(tok, sets, seq_len=sets["test"].chars // 50, counts={"test": 100})
    with pytest.raises(GraphfuseError, match="no text set named 'train'"):
        corpora.windows(tok, sets, seq_len=64, counts={"train": 1})
    with pytest.raises(GraphfuseError, match="at least 2 tokens"):
        corpora.windows(tok, sets, seq_len=1, counts={"test": 1})


# --- with SmolLM2's tokenizer -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """SmolLM2's tokenizer, from a private cache (copied from the user's cache when present)."""
    cache = tmp_path_factory.mktemp("smollm2-cache")
    cached = smollm2.default_cache_dir() / smollm2.GGUF_NAME
    if cached.is_file():
        (cache / smollm2.GGUF_NAME).symlink_to(cached)  # fetch() still verifies the checksum
    yield smollm2.load_tokenizer(cache)


@pytest.mark.slow
def test_sets_hold_enough_smollm2_tokens_and_windows_are_distinct(sets, tokenizer) -> None:
    from graphfuse import text

    # validation and test whole; calibration is ~8x its floor, so its first 800k characters do
    assert len(text.tokenize(sets["test"].text, tokenizer)) >= 20_000
    assert len(text.tokenize(sets["validation"].text, tokenizer)) >= 20_000
    assert len(text.tokenize(sets["calibration"].text[:800_000], tokenizer)) >= 100_000
    counts = {"calibration": 16, "validation": 4, "test": 4}
    w = corpora.windows(tokenizer, sets, seq_len=512, counts=counts)
    for name, n in counts.items():
        assert w[name].shape == (n, 512) and w[name].dtype == np.int64
        assert w[name].min() >= 0 and w[name].max() < len(tokenizer)
    rows = [tuple(r) for a in w.values() for r in a.tolist()]
    assert len(set(rows)) == len(rows)
    decoded = tokenizer.decode(w["test"][0].tolist())
    assert len(decoded) > 1000 and decoded[:200] in sets["test"].text


# --- last, as it reads the machine again without Vim --------------------------------------------


def test_without_vim_the_test_set_is_the_python_language_reference(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(corpora, "VIM_ROOTS", (tmp_path,))
    _clear_caches()
    try:
        sets = corpora.text_sets()
    finally:
        _clear_caches()
    assert (
        sets["test"].sources[0].startswith("Python")
        and "language reference" in sets["test"].sources[0]
    )
    assert not any("language reference" in src for src in sets["validation"].sources)
    assert sets["test"].chars >= _MIN_CHARS["test"]
