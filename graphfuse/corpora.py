"""Three named, disjoint text sets for calibration, validation and test, fixed in code.

The least-squares repair is fitted on one kind of text and must hold up on others, so the text
comes in three sets drawn from different sources on this machine, never sharing a paragraph:

    calibration  the standard library's docstrings (``text.stdlib_docstrings``), the prose this
                 machine carries under /usr/share/doc (READMEs, text, Markdown and reST files,
                 capped per package) and its licence texts (/usr/share/common-licenses and the
                 packages' copyright files, each distinct paragraph once), then the user's
                 ``--calib`` files; the repair is fitted on it
    validation   the GNU manuals in /usr/share/info and, when the test set does not take it,
                 the Python language reference (``pydoc_data/topics.py``); used to choose the
                 ridge λ and the shrinkage toward the plain repair
    test         the Vim user manual (/usr/share/vim/vim*/doc/usr_*.txt): tutorial prose about
                 a text editor, the furthest from the calibration text of what the machine
                 holds (there is no fiction on it); where Vim's runtime files are absent, the
                 Python language reference instead. The headline figures come from it.

Every set is deduplicated at paragraph level (paragraphs are blocks between blank lines, compared
by their lower-cased words): a paragraph goes to the first set that has it in the order test,
validation, calibration, and appears there once. So the test and validation sets depend only on
their own sources, and nothing the user passes can leak into them. Machine prose keeps only
paragraphs that read as English sentences (``_is_prose``); docstrings and the user's files are
kept whole but for repeated paragraphs. Files are read in sorted order, so the same machine always gives the same texts and
digests; unreadable, binary or non-UTF-8 machine files are skipped quietly.

``windows`` cuts token windows from a set without tokenising all of it: the set's text is split
into as many equal stretches as windows are asked for, and each window is the first ``seq_len``
tokens from a seeded random paragraph start inside its own stretch, so the windows are spread
over the set and never overlap.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import re
import sys
import sysconfig
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from graphfuse import text as _text
from graphfuse.errors import GraphfuseError

CALIBRATION, VALIDATION, TEST = "calibration", "validation", "test"
NAMES = (CALIBRATION, VALIDATION, TEST)

# Where the machine's prose lives (module constants, so tests can point them elsewhere).
DOC_ROOT = Path("/usr/share/doc")
LICENSE_ROOT = Path("/usr/share/common-licenses")
INFO_ROOT = Path("/usr/share/info")
VIM_ROOTS = (Path("/usr/share/vim"), Path("/usr/local/share/vim"))

# Caps, in characters of kept text, so that no package or manual dominates a set and reading
# stays fast (the whole of /usr/share/doc is ~20 MB of such files, mostly git's and node's).
_MAX_FILE_BYTES = 1 << 20  # read at most 1 MiB of any one file
_DOC_PER_PACKAGE = 24_000
_DOC_TOTAL = 1_500_000
_LICENCE_PER_FILE = 4_000
_LICENCE_TOTAL = 500_000
_INFO_PER_MANUAL = 60_000
_INFO_TOTAL = 1_000_000

_DOC_NAME = re.compile(
    r"(?i)^(readme.*|faq.*|.*\.(txt|text|md|markdown|rst))(\.gz)?$",
)
# Release notes and change logs are lists of one-line items: poor prose, and many of them.
_DOC_SKIP_NAME = re.compile(r"(?i)^(changelog|changes|news|history|copyright|relnotes)")
_DOC_SKIP_DIRS = frozenset({"RelNotes", "html", "examples", "api"})
# Info nodes that are licences or indices rather than the manual's prose.
_INFO_SKIP_NODE = re.compile(
    r"(?i)(licen[cs]e|copying|\bindex\b|\bGNU [AFGL]+\b|^tag table|^indirect)"
)

_INFO_MARKER = re.compile(rb"\x00\x08\[[^\x00]*\x00\x08\]")

# Common English function words: prose has many, code, tables and other languages few.
_FUNCTION_WORDS = (
    "a an the of to in on at by for from with as is are was were be been being it its this "
    "that these those and or but not no if then than when which who what where how can may "
    "must should will would you your we our they their there has have had do does"
)
_STOPWORDS = frozenset(_FUNCTION_WORDS.split())
_WORD = re.compile(r"[A-Za-z]+(?:['’][A-Za-z]+)?")
_KEY_WORD = re.compile(r"\w+")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


@dataclass(frozen=True)
class TextSet:
    """One named set of text: where it came from, the text itself and how many documents."""

    name: str  # "calibration" | "validation" | "test"
    sources: tuple[str, ...]  # one human-readable line per source, in the order read
    text: str  # the documents separated by blank lines
    documents: int

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def digest(self) -> str:
        """The first 12 hex digits of the SHA-256 of the UTF-8 text: equal digests, equal text."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()[:12]

    def paragraphs(self) -> list[str]:
        """The set's paragraphs: its text split at blank lines."""
        return paragraphs(self.text)

    def describe(self) -> str:
        """One line for a report: name, size, digest and sources."""
        return (
            f"{self.name}: {self.chars:,} characters in {self.documents:,} documents, "
            f"sha256 {self.digest}; " + "; ".join(self.sources)
        )


def paragraphs(text: str) -> list[str]:
    """Blocks of ``text`` between blank lines, stripped, empty ones dropped."""
    return [p.strip() for p in _BLANK_LINES.split(text) if p.strip()]


def paragraph_key(paragraph: str) -> str:
    """What two paragraphs must share to count as the same: their lower-cased words, in order."""
    return " ".join(_KEY_WORD.findall(paragraph.lower()))


def text_sets(calib_files: Sequence[str | Path] | None = None) -> dict[str, TextSet]:
    """The calibration, validation and test sets; ``calib_files`` join the calibration set.

    The user's files are UTF-8 text; a missing, empty or binary file, or a token-id file, raises
    GraphfuseError. Cached: the machine is read once per process, and the sets are built once per
    distinct list of user files and contents.
    """
    user = tuple((str(p), _user_text(Path(p))) for p in calib_files or ())
    return dict(_text_sets(user))


@functools.cache
def _text_sets(user: tuple[tuple[str, str], ...]) -> dict[str, TextSet]:
    vim = vim_manual()
    reference = python_reference()
    # The test source, and the packages whose documents the other sets must leave to it.
    test_source, test_packages = (vim, ("vim",)) if vim.documents else (reference, ())
    plan: list[tuple[str, list[_Source]]] = [
        (TEST, [test_source]),
        (VALIDATION, [gnu_info_manuals()] + ([reference] if test_source is vim else [])),
        (
            CALIBRATION,
            [stdlib_docstrings(), doc_prose(test_packages), licence_texts(test_packages)]
            + [_Source(f"user file {path}", (content,)) for path, content in user],
        ),
    ]
    seen: set[str] = set()  # paragraph keys already placed, in the order test, validation, ...
    sets: dict[str, TextSet] = {}
    for name, sources in plan:
        docs: list[str] = []
        described: list[str] = []
        for source in sources:
            kept = chars = 0
            for doc in source.docs:
                unique = _unseen_paragraphs(doc, seen)
                if unique:
                    docs.append("\n\n".join(unique))
                    kept += 1
                    chars += len(docs[-1])
            described.append(f"{source.label}: {kept:,} documents, {chars:,} characters")
        sets[name] = TextSet(name, tuple(described), "\n\n".join(docs), len(docs))
    return {name: sets[name] for name in NAMES}


def _unseen_paragraphs(doc: str, seen: set[str]) -> list[str]:
    kept = []
    for p in paragraphs(doc):
        key = paragraph_key(p)
        if key and key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


# --- sources ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Source:
    label: str
    docs: tuple[str, ...]

    @property
    def documents(self) -> int:
        return len(self.docs)


def stdlib_docstrings() -> _Source:
    version = ".".join(map(str, sys.version_info[:3]))
    return _Source(f"Python {version} standard-library docstrings", _text.stdlib_docstrings())


@functools.cache
def python_reference() -> _Source:
    """The Python language reference's topics, as ``pydoc`` shows them (pydoc_data/topics.py).

    Read with ``ast.literal_eval`` rather than imported; one document per topic, sorted by name.
    """
    version = ".".join(map(str, sys.version_info[:3]))
    path = Path(sysconfig.get_paths()["stdlib"]) / "pydoc_data" / "topics.py"
    docs: list[str] = []
    raw = _read_file(path)
    if raw is not None:
        try:
            tree = ast.parse(raw)
            topics = next(
                ast.literal_eval(node.value)
                for node in tree.body
                if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets)
            )
        except (SyntaxError, ValueError, StopIteration):
            topics = {}
        for name in sorted(topics):
            doc = _prose_only(str(topics[name]))
            if doc:
                docs.append(doc)
    return _Source(f"Python {version} language reference ({path})", tuple(docs))


@functools.cache
def vim_manual() -> _Source:
    """The chapters of the Vim user manual (usr_*.txt of the newest runtime found), cleaned."""
    candidates = (
        d
        for root in VIM_ROOTS
        if root.is_dir()
        for d in root.glob("vim*/doc")
        if re.fullmatch(r"vim\d+", d.parent.name) and d.is_dir()
    )
    for doc_dir in sorted(candidates, key=lambda d: -int(d.parent.name[3:])):  # newest first
        chapters = sorted(p for p in doc_dir.glob("usr_*.txt") if p.name != "usr_toc.txt")
        docs = []
        for path in chapters:
            raw = _read_file(path)
            doc = _prose_only(_clean_vim_help(raw)) if raw is not None else ""
            if doc:
                docs.append(doc)
        if docs:
            return _Source(f"Vim user manual ({doc_dir}/usr_*.txt)", tuple(docs))
    return _Source("Vim user manual (not found)", ())


@functools.cache
def gnu_info_manuals() -> _Source:
    """The GNU manuals in /usr/share/info (coreutils, grep, sed, find, …), capped per manual.

    Licence and index nodes are left out; each manual is one document.
    """
    manuals: dict[str, list[Path]] = {}
    if INFO_ROOT.is_dir():
        for path in sorted(INFO_ROOT.iterdir()):
            match = re.fullmatch(r"(.+)\.info(-(\d+))?(\.gz)?", path.name)
            if match and path.is_file():
                manuals.setdefault(match[1], []).append(path)
    docs: list[str] = []
    total = 0
    for name in sorted(manuals):
        # find.info holds the indirect table; its parts are find.info-1, find.info-2, … in order.
        parts = sorted(manuals[name], key=_info_part)
        kept: list[str] = []
        size = 0
        for path in parts:
            raw = _read_file(path, info=True)
            if raw is None:
                continue
            for node in raw.split("\x1f"):
                header, _, body = node.strip("\n").partition("\n")
                match = re.search(r"Node: ([^,\n]+)", header)
                if not match or _INFO_SKIP_NODE.search(match[1]):
                    continue
                for p in _prose_paragraphs(body):
                    if size >= _INFO_PER_MANUAL:
                        break
                    kept.append(p)
                    size += len(p)
        if kept and total < _INFO_TOTAL:
            docs.append("\n\n".join(kept))
            total += size
    return _Source(f"GNU manuals in {INFO_ROOT} ({', '.join(sorted(manuals))})", tuple(docs))


def _info_part(path: Path) -> int:
    """0 for name.info(.gz), N for its part name.info-N(.gz)."""
    match = re.search(r"\.info-(\d+)", path.name)
    return int(match[1]) if match else 0


@functools.cache
def doc_prose(skip_packages: tuple[str, ...] = ()) -> _Source:
    """Prose files of the packages under /usr/share/doc: READMEs, FAQs, text, Markdown, reST.

    Change logs, release notes, HTML and copyright files are left out; packages whose names
    start with one of ``skip_packages`` too. Each file is one document; at most
    ``_DOC_PER_PACKAGE`` characters are kept per package and ``_DOC_TOTAL`` in all.
    """
    docs: list[str] = []
    packages = 0
    total = 0
    for package in _sorted_dirs(DOC_ROOT):
        if package.name.startswith(skip_packages):
            continue
        size = 0
        for path in _walk_files(package):
            if size >= _DOC_PER_PACKAGE or total + size >= _DOC_TOTAL:
                break
            if not _DOC_NAME.match(path.name) or _DOC_SKIP_NAME.match(path.name):
                continue
            if _DOC_SKIP_DIRS.intersection(path.relative_to(package).parts[:-1]):
                continue
            raw = _read_file(path)
            if raw is None:
                continue
            kept: list[str] = []
            for p in _prose_paragraphs(_clean_markup(raw)):
                if size >= _DOC_PER_PACKAGE:
                    break
                kept.append(p)
                size += len(p)
            if kept:
                docs.append("\n\n".join(kept))
        packages += size > 0
        total += size
    return _Source(f"prose files of {packages} packages in {DOC_ROOT}", tuple(docs))


@functools.cache
def licence_texts(skip_packages: tuple[str, ...] = ()) -> _Source:
    """Licence texts: /usr/share/common-licenses in full, then the packages' copyright files.

    The machine-readable Debian copyright format is unfolded (field lines dropped, " ." lines
    made blank), so that a licence quoted in a hundred copyright files is the same paragraphs
    every time, and each distinct paragraph is kept once. A copyright file adds at most
    ``_LICENCE_PER_FILE`` characters of paragraphs not seen before, and all of them together at
    most ``_LICENCE_TOTAL``: there are hundreds of near-identical MIT and BSD variants. Packages
    whose names start with one of ``skip_packages`` are left out.
    """
    docs: list[str] = []
    seen_files: set[Path] = set()
    seen: set[str] = set()
    total = 0
    common = list(_walk_files(LICENSE_ROOT)) if LICENSE_ROOT.is_dir() else []
    copyrights = [
        d / "copyright" for d in _sorted_dirs(DOC_ROOT) if not d.name.startswith(skip_packages)
    ]
    for path in common + copyrights:
        if total >= _LICENCE_TOTAL:
            break
        try:
            real = path.resolve()
        except OSError:
            continue
        if real in seen_files or not real.is_file():
            continue
        seen_files.add(real)
        raw = _read_file(real)
        if raw is None:
            continue
        if path.name == "copyright" and raw.startswith("Format:"):
            raw = _unfold_dep5(raw)
        cap = _LICENCE_PER_FILE if path.name == "copyright" else _LICENCE_TOTAL
        kept: list[str] = []
        size = 0
        for p in _prose_paragraphs(raw):
            key = paragraph_key(p)
            if key in seen:
                continue
            if size + len(p) > cap:
                break
            seen.add(key)
            kept.append(p)
            size += len(p)
        if kept:
            docs.append("\n\n".join(kept))
            total += size
    return _Source(f"licence texts in {LICENSE_ROOT} and {DOC_ROOT}/*/copyright", tuple(docs))


def check_text_files(paths: Sequence[str | Path]) -> None:
    """Refuse, in one line, a user's text file that is missing, empty, binary or not UTF-8."""
    for path in paths:
        _user_text(Path(path))


def _user_text(path: Path) -> str:
    """The text of a user's ``--calib`` file; GraphfuseError when it is not usable text."""
    if path.suffix in _text.TOKEN_ID_SUFFIXES:
        raise GraphfuseError(
            f"{path} holds token ids, and a text set takes text: pass it where token files are "
            f"taken, or pass the text it was made from"
        )
    if not path.is_file():
        raise GraphfuseError(f"{path} does not exist or is not a file: check the path")
    data = path.read_bytes()
    if b"\0" in data:
        raise GraphfuseError(
            f"{path} holds NUL bytes, so it is binary, not text: pass a UTF-8 text file"
        )
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise GraphfuseError(f"{path} is not UTF-8 text ({exc}); convert it first") from exc
    if not content.strip():
        raise GraphfuseError(f"{path} is empty: pass a text file with some prose in it")
    return content.replace("\r\n", "\n")


# --- reading and cleaning ---------------------------------------------------------------------


def _sorted_dirs(root: Path) -> list[Path]:
    try:
        return sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []


def _walk_files(root: Path) -> Iterator[Path]:
    """Regular files under ``root``, depth-first in sorted order, symlinked folders not followed."""
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return
    for entry in entries:
        if entry.is_symlink() and entry.is_dir():
            continue
        if entry.is_dir():
            yield from _walk_files(entry)
        elif entry.is_file():
            yield entry


def _read_file(path: Path, *, info: bool = False) -> str | None:
    """At most ``_MAX_FILE_BYTES`` of UTF-8 text, gunzipped if need be; None if unreadable/binary.

    ``info``: drop the NUL-bracketed markers that Info files put around index entries first.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                data = f.read(_MAX_FILE_BYTES)
        else:
            with path.open("rb") as f:
                data = f.read(_MAX_FILE_BYTES)
    except (OSError, EOFError, zlib.error):
        return None
    if info:
        data = _INFO_MARKER.sub(b"", data)
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(data) - 4:  # not merely a character cut by the size cap
            return None
        return data[: exc.start].decode("utf-8")


def _is_prose(paragraph: str) -> bool:
    """Whether a paragraph reads as English sentences rather than code, tables or lists.

    At least 8 words; words make up at least 70% of the non-blank characters; at least 15% of
    the words are common English function words (code, option tables and other languages have
    few); and it ends like a sentence.
    """
    words = _WORD.findall(paragraph)
    if len(words) < 8:
        return False
    visible = sum(not c.isspace() for c in paragraph)
    if sum(map(len, words)) < 0.7 * visible:
        return False
    if sum(w.lower() in _STOPWORDS for w in words) < 0.15 * len(words):
        return False
    return paragraph.rstrip()[-1:] in set(".!?:;)\"'”’")


def _prose_paragraphs(raw: str) -> Iterator[str]:
    """The prose paragraphs of ``raw``, each line stripped of its indentation."""
    for p in paragraphs(raw):
        p = "\n".join(line.strip() for line in p.splitlines())
        if _is_prose(p):
            yield p


def _prose_only(raw: str) -> str:
    return "\n\n".join(_prose_paragraphs(raw))


_MD_FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.M | re.S)
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_HTML_TAG = re.compile(r"<[^<>\n]{1,200}>")
_RST_DIRECTIVE = re.compile(r"^\.\. .*$", re.M)
_HEADING_MARK = re.compile(r"^#{1,6}\s+", re.M)


def _clean_markup(raw: str) -> str:
    """Markdown and reST reduced to their words: no code fences, link targets, tags, directives."""
    raw = _MD_FENCE.sub("", raw)
    raw = _MD_LINK.sub(r"\1", raw)
    raw = _HTML_TAG.sub("", raw)
    raw = _RST_DIRECTIVE.sub("", raw)
    return _HEADING_MARK.sub("", raw)


def _unfold_dep5(raw: str) -> str:
    """The free text of a machine-readable Debian copyright file, as plain paragraphs."""
    lines = []
    for line in raw.splitlines():
        if line[:1] in (" ", "\t"):
            body = line[1:]
            lines.append("" if body.strip() == "." else body)
        else:
            lines.append("")  # a field line ("License: GPL-2+") ends the paragraph before it
    return "\n".join(lines)


_VIM_TAG = re.compile(r"\*([^*\s|]+)\*")
_VIM_LINK = re.compile(r"\|([^|\s]+)\|")


def _clean_vim_help(raw: str) -> str:
    """A Vim help file as plain text: examples, rulers, tags and link bars removed."""
    out: list[str] = []
    in_example = False
    for line in raw.splitlines():
        if in_example:
            if line.startswith("<"):
                in_example = False
                line = line[1:]
            elif not line.strip() or line[:1] in (" ", "\t"):
                continue  # an example line, or a blank one inside the example
            else:
                in_example = False
        if re.fullmatch(r"[=\-]{10,}\s*", line):
            out.append("")
            continue
        if line.endswith(">") and (line == ">" or line[-2:-1].isspace()):
            line = line[:-1].rstrip()
            in_example = True
            out.extend([_VIM_TAG.sub("", _VIM_LINK.sub(r"\1", line)), ""])  # the example: a break
            continue
        line = _VIM_TAG.sub("", line)
        line = _VIM_LINK.sub(r"\1", line)
        out.append(line)
    return "\n".join(out)


# --- windows ----------------------------------------------------------------------------------


def windows(
    tokenizer: Any,
    sets: Mapping[str, TextSet],
    *,
    seq_len: int,
    counts: Mapping[str, int],
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``counts[name]`` windows of ``seq_len`` token ids from each named set, int64 [n, seq_len].

    A set's text is cut into ``n`` equal stretches; each window is the first ``seq_len`` tokens
    from a random paragraph start in its own stretch (the stretch's start when no later one
    leaves room). The windows are spread over the set, never overlap, and depend only on the
    set's text, ``seq_len``, ``n``, ``seed`` and the set's name.
    """
    if seq_len < 2:
        raise GraphfuseError(f"seq_len is {seq_len}: a window needs at least 2 tokens")
    out: dict[str, np.ndarray] = {}
    for name, n in counts.items():
        if name not in sets:
            raise GraphfuseError(
                f"no text set named {name!r}: the sets are {', '.join(map(repr, sets))}"
            )
        if n < 0:
            raise GraphfuseError(f"{n} windows asked of the {name} set: ask for 0 or more")
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        out[name] = _set_windows(tokenizer, sets[name], seq_len, n, rng)
    return out


def _set_windows(
    tokenizer: Any, text_set: TextSet, seq_len: int, n: int, rng: np.random.Generator
) -> np.ndarray:
    text = text_set.text
    result = np.zeros((n, seq_len), dtype=np.int64)
    bounds = [round(k * len(text) / n) for k in range(n + 1)] if n else [0]
    budget = 8 * seq_len  # characters that hold seq_len tokens of prose with a wide margin
    for k in range(n):
        lo, hi = bounds[k], bounds[k + 1]
        # Where to start, best first: a random paragraph start that leaves a budget's room, the
        # stretch's first paragraph start, the stretch's start.
        starts = [_paragraph_start(text, lo, hi), lo]
        if hi - budget > lo:
            starts.insert(0, _paragraph_start(text, int(rng.integers(lo, hi - budget)), hi))
        for start in dict.fromkeys(s for s in starts if s is not None):
            ids = _text.tokenize(text[start : min(hi, start + budget)], tokenizer)
            if len(ids) <= seq_len and start + budget < hi:
                ids = _text.tokenize(text[start:hi], tokenizer)
            # More tokens than needed, so the last one taken is not a word cut by the slice.
            if len(ids) > seq_len:
                result[k] = ids[:seq_len]
                break
        else:
            raise GraphfuseError(
                f"the {text_set.name} set holds {len(text):,} characters "
                f"({'; '.join(text_set.sources) or 'no source'}), too few for {n} windows of "
                f"{seq_len} tokens: ask for fewer or shorter windows"
            )
    return result


def _paragraph_start(text: str, at: int, before: int) -> int | None:
    """The first paragraph start at or after ``at`` and before ``before``, if any."""
    if at == 0 or text[at - 2 : at] == "\n\n":
        return at
    found = text.find("\n\n", at, before)
    if found < 0:
        return None
    start = found + 2
    while start < before and text[start] == "\n":
        start += 1
    return start if start < before else None


def token_counts(tokenizer: Any, sets: Mapping[str, TextSet]) -> dict[str, int]:
    """How many tokens each set's whole text makes (tokenises all of it: seconds per MB)."""
    return {name: len(_text.tokenize(s.text, tokenizer)) for name, s in sets.items()}
