"""Text and thin helpers around the pipeline (`graphfuse.pipeline`): the tokenizer, token
windows of the user's files or the standard library's docstrings, and in-memory sessions,
perplexity and repair for logits models (input ``input_ids``, output ``logits``). Run
selection and healing live in the pipeline (`Pipeline.select`, `Pipeline.fuse_and_heal`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphfuse.errors import GraphfuseError


def tokenizer(name: str | Path | None = None) -> Any:
    """A Hugging Face tokenizer from a folder, or SmolLM2's (the embedded default) for None."""
    if name is None:
        from graphfuse.models import smollm2

        return smollm2.load_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(name))
    except Exception as e:
        raise GraphfuseError(f"cannot load a tokenizer from {name}: {e}") from None


def windows(
    files: Sequence[Path] | None,
    tok: Any,
    *,
    quick: bool = False,
    seq_len: int | None = None,
    calibration: int | None = None,
):
    """Disjoint calibration / validation / evaluation windows of the user's files, or of the
    standard library's docstrings; ``calibration`` windows (default 4 quick, else 16)."""
    from graphfuse import text

    counts = (
        {"evaluation": 2, "validation": 2, "calibration": 4}
        if quick
        else {"evaluation": 4, "validation": 4, "calibration": 16}
    )
    if calibration is not None:
        counts["calibration"] = calibration
    return text.make_windows(tok, files, seq_len=seq_len or (256 if quick else 512), **counts)


def feeds(ids: np.ndarray, batch: int = 2) -> list[dict[str, np.ndarray]]:
    return [{"input_ids": ids[i : i + batch]} for i in range(0, len(ids), batch)]


def session(model: onnx.ModelProto, threads: int | None = None):
    """An ONNX Runtime CPU session of an in-memory model (graphfuse.pipeline.Sessions)."""
    from graphfuse.pipeline import Sessions

    return Sessions(threads)(model)


def perplexity(model: onnx.ModelProto, ids: np.ndarray, threads: int | None = None) -> float:
    from graphfuse import evaluate

    return evaluate.perplexity(session(model, threads), ids, progress=False)


def fuse_and_repair(
    model: onnx.ModelProto,
    runs: list[tuple[int, int]],
    calibration: np.ndarray,
    validation: np.ndarray,
    threads: int | None = None,
    progress: bool = True,
    cache: dict | None = None,
    reference: onnx.ModelProto | None = None,
    requantize: bool = False,
    linear: bool = False,
):
    """Fuse ``runs`` and refit each fused down-projection (see graphfuse.repair); ``cache``
    keeps fits between calls on the same model and data; ``reference`` (the model before
    attention removal) makes the fit heal the removal too; ``linear`` adds the run's
    normalised input to what the fit reads."""
    from graphfuse.repair import repair_runs

    return repair_runs(
        model, runs, feeds(calibration), feeds(validation), threads=threads, progress=progress,
        cache=cache, reference=reference, requantize=requantize, linear=linear,
    )  # fmt: skip
