"""The code base stays linted, formatted and type-checked (the GPU paths included: they are only
ever checked statically here)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["graphfuse", "passes", "models", "tools", "tests"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.skipif(
    shutil.which("ruff") is None, reason="ruff is not installed (pip install -e .[test])"
)
def test_ruff() -> None:
    check = _run("ruff", "check", *SOURCES)
    assert check.returncode == 0, check.stdout
    fmt = _run("ruff", "format", "--check", *SOURCES)
    assert fmt.returncode == 0, fmt.stdout


def test_mypy() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e .[test])")
    result = _run(sys.executable, "-m", "mypy", "graphfuse", "passes", "models")
    assert result.returncode == 0, result.stdout
