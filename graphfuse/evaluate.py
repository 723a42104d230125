"""Accuracy of ONNX language models under ONNX Runtime: perplexity and top-1 agreement.

Both measures run a model on windows of token ids (int64 [n, seq], e.g. from
``graphfuse.text.split_tokens``) and read its ``logits`` output [batch, seq, vocab]:

- ``perplexity``: exp of the mean next-token cross entropy over every position that has a next
  token in its window (n × (seq - 1) predictions);
- ``top1_agreement``: the fraction of positions (n × seq) where two models' most likely next
  token is the same, the usual measure of how far an approximation (fusion) moved a model.

A model is a path or an ``InferenceSession``. Besides ``input_ids`` the model may take the
decoder inputs of ``graphfuse.models.smollm2.export_decoder`` or of onnxruntime-genai's builder:
``attention_mask`` (all ones), ``position_ids`` (0 .. seq-1) and ``past*`` caches (empty, i.e.
prefill). Windows run in batches, so memory stays bounded by ``batch_size × seq × vocab``
logits.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import onnxruntime as ort
from tqdm import tqdm

from graphfuse.errors import GraphfuseError

ModelLike: TypeAlias = str | os.PathLike[str] | ort.InferenceSession

_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
_INT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32}


def make_session(
    path: str | os.PathLike[str] | Any,
    provider: str = "CPUExecutionProvider",
    threads: int | None = None,
    optimization: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """An ONNX Runtime session of ``path`` (or of an in-memory ModelProto) that really runs on
    ``provider``: graphfuse's one session factory.

    ONNX Runtime falls back to the CPU silently (onnxruntime-gpu on a machine with no GPU), so
    the providers the session ended up with are checked. ``threads`` sets the intra-op threads
    (ONNX Runtime's default: one per physical core). No memory arena: a session gives back what
    a run took (a window's logits are 100 MB), so peaks do not add up across sessions.
    """
    available = ort.get_available_providers()
    if provider not in available:
        raise GraphfuseError(
            f"{provider} is not in this onnxruntime (it has {', '.join(available)}): install the "
            f"onnxruntime package built with it, or use CPUExecutionProvider"
        )
    options = ort.SessionOptions()
    options.graph_optimization_level = optimization
    options.enable_cpu_mem_arena = False
    if threads:
        options.intra_op_num_threads = threads
    source = path if isinstance(path, str | os.PathLike) else path.SerializeToString()
    session = ort.InferenceSession(
        os.fspath(source) if isinstance(source, os.PathLike) else source,
        sess_options=options, providers=[provider],
    )  # fmt: skip
    if provider not in session.get_providers():
        raise GraphfuseError(
            f"onnxruntime could not start {provider} and fell back to "
            f"{', '.join(session.get_providers())}: check the device and its drivers"
        )
    return session


def perplexity(
    model: ModelLike,
    windows: np.ndarray,
    *,
    batch_size: int = 2,
    progress: bool | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
) -> float:
    """exp(mean next-token cross entropy) of ``model`` over ``windows`` (int64 [n, seq]).

    ``progress``: show a progress bar (None: only when stderr is a terminal). ``extra``: more
    feeds for every batch (e.g. the attention gates of the importance scan). ``dims``: sizes of
    symbolic cache dimensions, e.g. ``{"kv_cache_dim": head_size}`` for an onnxruntime-genai
    decoder (see ``prefill_feeds``).
    """
    return score(
        model, windows, batch_size=batch_size, progress=progress, extra=extra, dims=dims
    ).perplexity


@dataclass
class Score:
    perplexity: float
    top1: np.ndarray  # the predicted next token at every position [n, seq]
    agreement: float | None  # fraction of positions agreeing with the reference's top1


def score(
    model: ModelLike,
    windows: np.ndarray,
    *,
    reference_top1: np.ndarray | None = None,
    batch_size: int = 2,
    progress: bool | None = None,
    extra: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
) -> Score:
    """Perplexity and top-1 predictions in one pass; agreement with ``reference_top1`` (the
    ``top1`` of another model's score on the same windows) when given."""
    session = _session(model)
    total_nll, count = 0.0, 0
    tops = []
    for ids in _batches(windows, batch_size, progress, "perplexity"):
        full = _logits(session, ids, extra, dims).astype(np.float32)
        tops.append(full.argmax(axis=-1))
        logits = full[:, :-1]
        targets = ids[:, 1:]
        peak = logits.max(axis=-1, keepdims=True)
        log_norm = np.log(np.exp(logits - peak).sum(axis=-1)) + peak[..., 0]
        picked = np.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total_nll += float((log_norm - picked).sum(dtype=np.float64))
        count += targets.size
    top1 = np.concatenate(tops)
    agreement = None if reference_top1 is None else float(np.mean(top1 == reference_top1))
    return Score(float(np.exp(total_nll / count)), top1, agreement)


def top1_agreement(
    model_a: ModelLike,
    model_b: ModelLike,
    windows: np.ndarray,
    *,
    batch_size: int = 2,
    progress: bool | None = None,
    dims: Mapping[str, int] | None = None,
) -> float:
    """Fraction of positions of ``windows`` where both models predict the same next token."""
    session_a, session_b = _session(model_a), _session(model_b)
    agree, count = 0, 0
    for ids in _batches(windows, batch_size, progress, "top-1 agreement"):
        top_a = _logits(session_a, ids, dims=dims).argmax(axis=-1)
        top_b = _logits(session_b, ids, dims=dims).argmax(axis=-1)
        agree += int((top_a == top_b).sum())
        count += top_a.size
    return agree / count


def _session(model: ModelLike) -> ort.InferenceSession:
    return model if isinstance(model, ort.InferenceSession) else make_session(model)


def _batches(
    windows: np.ndarray, batch_size: int, progress: bool | None, desc: str
) -> Iterator[np.ndarray]:
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or not np.issubdtype(windows.dtype, np.integer):
        raise GraphfuseError(
            f"windows must be integer token ids of shape [n, seq ≥ 2], got {windows.dtype} "
            f"{list(windows.shape)}: see graphfuse.text.split_tokens"
        )
    if len(windows) == 0:
        raise GraphfuseError("no windows to evaluate: pass at least one window of tokens")
    windows = windows.astype(np.int64, copy=False)
    # disable=None lets tqdm show the bar only on a terminal.
    disable = None if progress is None else not progress
    bar = tqdm(total=len(windows), desc=desc, unit="window", leave=False, disable=disable)
    with bar:
        for start in range(0, len(windows), batch_size):
            ids = windows[start : start + batch_size]
            yield ids
            bar.update(len(ids))


def _logits(
    session: ort.InferenceSession,
    ids: np.ndarray,
    extra: Mapping[str, np.ndarray] | None = None,
    dims: Mapping[str, int] | None = None,
) -> np.ndarray:
    outputs = [o.name for o in session.get_outputs()]
    name = "logits" if "logits" in outputs else outputs[0]
    extra = extra or {}
    return session.run([name], {**prefill_feeds(session, ids, extra, dims), **extra})[0]


class Inputs:
    """What `prefill_feeds` reads of a session (its inputs' names, shapes and types), taken from
    an ONNX model's graph: feeds without a session, so without a copy of the weights."""

    @dataclass(frozen=True)
    class Arg:
        name: str
        shape: list
        type: str

    def __init__(self, model: Any) -> None:
        from onnx import helper

        self._args = []
        for v in model.graph.input:
            t = v.type.tensor_type
            name = helper.tensor_dtype_to_string(t.elem_type).removeprefix("TensorProto.")
            dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in t.shape.dim]
            self._args.append(self.Arg(v.name, dims, f"tensor({name.lower()})"))

    def get_inputs(self) -> list[Arg]:
        return self._args


def prefill_feeds(
    session: ort.InferenceSession | Inputs,
    ids: np.ndarray,
    given: Mapping[str, Any] | None = None,
    dims: Mapping[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for one full-window forward pass of ``ids``, but those ``given``: the ids, and a
    decoder's inputs for a prefill (all-ones mask, positions 0 … seq-1, empty cache).

    A cache input (``past*`` of rank 4: [batch, kv_heads, past_seq, head_size]) is made with
    past_seq = 0 and the declared heads and head size; a symbolic one of those (the model
    builder's ``kv_cache_dim``) is read from ``dims`` or from the shape of a ``given`` input
    that declares the same symbol."""
    batch, seq = ids.shape
    given = given or {}
    declared = session.get_inputs()
    if "input_ids" not in {arg.name for arg in declared}:
        raise GraphfuseError("the model has no input_ids input: it is not a language model")
    bound = {
        symbol: size
        for arg in declared
        if arg.name in given
        for symbol, size in zip(arg.shape, np.shape(given[arg.name]), strict=False)
        if isinstance(symbol, str)
    }
    bound.update(dims or {})
    feeds: dict[str, Any] = {}
    for arg in declared:
        if arg.name in given:
            continue
        if arg.name == "input_ids":
            feeds[arg.name] = ids
        elif arg.name == "attention_mask":
            feeds[arg.name] = np.ones((batch, seq), dtype=_INT_TYPES.get(arg.type, np.int64))
        elif arg.name == "position_ids":
            feeds[arg.name] = np.tile(np.arange(seq, dtype=np.int64), (batch, 1))
        elif arg.name.startswith("past") and len(arg.shape) == 4 and arg.type in _NUMPY_TYPES:
            heads, head_size = (_size(arg, axis, bound) for axis in (1, 3))
            feeds[arg.name] = np.zeros((batch, heads, 0, head_size), dtype=_NUMPY_TYPES[arg.type])
        else:
            raise GraphfuseError(
                f"model input {arg.name!r} is none of input_ids, attention_mask, position_ids, "
                f"past* (a cache of rank 4): evaluate a logits model "
                f"(graphfuse.models.smollm2.export_logits)"
            )
    return feeds


def _size(arg: Any, axis: int, dims: Mapping[str, int]) -> int:
    """A declared dimension of ``arg``: a number, or a symbol bound in ``dims``."""
    size = arg.shape[axis]
    if isinstance(size, int):
        return size
    if size in dims:
        return dims[size]
    raise GraphfuseError(
        f"model input {arg.name!r} declares dimension {axis} as {size!r}, not a number: pass "
        f"dims={{{size!r}: …}} (onnxruntime-genai's kv_cache_dim is the head size, "
        f"model.decoder.head_size in genai_config.json)"
    )
