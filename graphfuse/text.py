"""Calibration, validation and evaluation tokens, with no network.

The default corpus is the docstrings of the Python standard library on this machine: English
technical prose, always present, read from the source files with ``ast`` (no module is imported,
so nothing runs). It is deterministic for a given Python version (3.11: ~8k distinct docstrings,
1.8 M characters, ~460k SmolLM2 tokens) and differs between versions. Users can pass their own
text files or token-id files instead.

Tokens are cut into fixed-length windows, which are dealt into three disjoint parts:

    token stream  ──►  [w0][w1][w2] … [wn-1]      (n = len // seq_len, the tail is dropped)
                       seeded permutation of the window indices
                       first `evaluation` → evaluation, next `validation` → validation,
                       next `calibration` → calibration (each part kept in stream order)

so the parts never share a token, each part samples the whole corpus rather than one end of it,
and the same tokens and arguments always give the same windows.
"""

from __future__ import annotations

import ast
import functools
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphfuse.errors import GraphfuseError

# Folders of the standard library that hold test code and data rather than documented modules
# (test files also contain deliberately broken or odd text), and installed third-party packages.
_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages"})

TOKEN_ID_SUFFIXES = (".npy", ".ids")  # files of token ids; every other file is read as text


@dataclass(frozen=True)
class TokenWindows:
    """Disjoint windows of token ids, each an int64 array of shape [n, seq_len]."""

    calibration: np.ndarray
    validation: np.ndarray
    evaluation: np.ndarray

    @property
    def seq_len(self) -> int:
        return int(self.evaluation.shape[1])


@functools.cache
def stdlib_docstrings() -> tuple[str, ...]:
    """Every distinct docstring of the standard library, in sorted file order then source order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    docs: list[str] = []
    for path in _stdlib_sources(root):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError):  # a few files are data or Python-2 grammar
            continue
        for doc in _docstrings(tree):
            if doc not in seen:
                seen.add(doc)
                docs.append(doc)
    return tuple(docs)


def stdlib_corpus() -> str:
    """The default corpus: the standard library's docstrings separated by blank lines."""
    return "\n\n".join(stdlib_docstrings())


def _stdlib_sources(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes os.walk's order; pruning here keeps it out of site-packages.
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIPPED_DIRS and d != "__pycache__")
        for name in sorted(filenames):
            if name.endswith(".py"):
                yield Path(dirpath, name)


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of a module and of its classes and functions, nested ones included."""
    if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            yield doc.strip()
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def tokenize(text: str, tokenizer: Any) -> np.ndarray:
    """Token ids of ``text`` as an int64 vector, with no special tokens added."""
    # verbose=False: the corpus is far longer than the model's context, on purpose.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return np.asarray(ids, dtype=np.int64)


def load_tokens(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], tokenizer: Any = None
) -> np.ndarray:
    """Token ids of the user's files, concatenated in the order given.

    ``.npy`` files hold integer ids (any shape, flattened); ``.ids`` files hold whitespace-
    separated integer ids; every other file is UTF-8 text and is tokenised with ``tokenizer``.
    Ids are checked against the tokenizer's vocabulary when a tokenizer is given.
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    parts = [_read_tokens(Path(p), tokenizer) for p in paths]
    if not parts:
        raise GraphfuseError("no token files given: pass at least one text or token-id file")
    tokens = np.concatenate(parts)
    if tokenizer is not None and tokens.size:
        vocab = len(tokenizer)
        if tokens.min() < 0 or tokens.max() >= vocab:
            raise GraphfuseError(
                f"token ids range over [{tokens.min()}, {tokens.max()}] but the tokenizer has "
                f"{vocab} tokens: the id files were made with another tokenizer"
            )
    return tokens


def _read_tokens(path: Path, tokenizer: Any) -> np.ndarray:
    if not path.is_file():
        raise GraphfuseError(f"{path} does not exist or is not a file: check the path")
    if path.suffix == ".npy":
        ids = np.load(path, allow_pickle=False)
        if not np.issubdtype(ids.dtype, np.integer):
            raise GraphfuseError(f"{path} holds {ids.dtype}, not integer token ids")
        return ids.astype(np.int64).reshape(-1)
    if path.suffix == ".ids":
        try:
            return np.array(path.read_text().split(), dtype=np.int64)
        except ValueError as exc:
            raise GraphfuseError(f"{path} is not whitespace-separated integer ids ({exc})") from exc
    if tokenizer is None:
        raise GraphfuseError(f"{path} is text and needs a tokenizer; pass one, or use .npy/.ids")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise GraphfuseError(f"{path} is not UTF-8 text ({exc}); convert it first") from exc
    return tokenize(text, tokenizer)


def split_tokens(
    tokens: np.ndarray,
    *,
    seq_len: int = 512,
    evaluation: int = 4,
    validation: int = 4,
    calibration: int | None = 16,
    seed: int = 0,
) -> TokenWindows:
    """Cut ``tokens`` into windows of ``seq_len`` and deal them into three disjoint parts.

    ``calibration=None`` takes every window left after evaluation and validation. The evaluation
    and validation windows depend only on the tokens, ``seq_len``, their counts and ``seed``, so
    asking for more calibration data never changes them.
    """
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if seq_len < 2:
        raise GraphfuseError(f"seq_len is {seq_len}: a window needs at least 2 tokens")
    count = len(tokens) // seq_len
    rest = count - evaluation - validation
    wanted = rest if calibration is None else calibration
    if min(evaluation, validation, wanted) < 0 or rest < wanted:
        raise GraphfuseError(
            f"{len(tokens)} tokens make {count} windows of {seq_len}, fewer than the "
            f"{evaluation} + {validation} + {calibration} asked for: pass more text, or ask for "
            f"fewer or shorter windows"
        )
    windows = tokens[: count * seq_len].reshape(count, seq_len)
    order = np.random.default_rng(seed).permutation(count)
    cuts = np.cumsum([evaluation, validation, wanted])

    def part(lo: int, hi: int) -> np.ndarray:
        return np.ascontiguousarray(windows[np.sort(order[lo:hi])])

    return TokenWindows(
        evaluation=part(0, cuts[0]),
        validation=part(cuts[0], cuts[1]),
        calibration=part(cuts[1], cuts[2]),
    )


def make_windows(
    tokenizer: Any,
    sources: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | None = None,
    **split: Any,
) -> TokenWindows:
    """Windows of the user's files (``sources``), or of the standard library's docstrings.

    ``split`` is passed on to ``split_tokens`` (seq_len, evaluation, validation, calibration, seed).
    """
    if sources is None:
        tokens = tokenize(stdlib_corpus(), tokenizer)
    else:
        tokens = load_tokens(sources, tokenizer)
    return split_tokens(tokens, **split)
