"""One call for an export pipeline: a PyTorch module in, the fused ONNX model and its report out.

    model, report = graphfuse.fuse_module(net, (input_ids,), runs="all", keep_last=True)

The module is exported with the dynamo exporter (onnxscript), its IR version clamped to one
ONNX Runtime reads, and passed to `graphfuse.fuse`. A Hugging Face causal LM is wrapped so that
it takes ``input_ids`` and returns ``logits`` with no cache.
"""

from __future__ import annotations

from typing import Any

import onnx

from graphfuse.api import FusionReport, fuse

MAX_IR_VERSION = 10  # what onnxruntime ≥ 1.20 reads; onnx 1.23 would write 14


def export_module(
    module: Any,
    example_inputs: tuple,
    *,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    dynamic_shapes: Any = None,
    opset: int | None = 18,
) -> onnx.ModelProto:
    """``module`` as an ONNX model, exported by torch.onnx's dynamo exporter (the TorchScript
    one fails on transformers 5), its IR version clamped to one ONNX Runtime reads."""
    import warnings

    import torch

    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # Exporter-internal noise, not the user's business: a pytree deprecation inside torch,
        # and a note for every Dim that is named more than once (batch in all inputs).
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares")
        program = torch.onnx.export(
            module,
            example_inputs,
            dynamo=True,
            optimize=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            verbose=False,
        )
    assert program is not None  # None only when dynamo=False
    proto = program.model_proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    return proto


def fuse_module(
    module: Any,
    example_inputs: tuple,
    runs: str | list[tuple[int, int]] = "all",
    *,
    max_run_length: int | None = None,
    keep_last: bool = False,
    **export_options: Any,
) -> tuple[onnx.ModelProto, FusionReport]:
    """Export ``module`` and fuse its FFN runs; return the fused model and the report."""
    proto = export_module(_plain_logits(module), example_inputs, **export_options)
    return fuse(proto, runs, max_run_length=max_run_length, keep_last=keep_last)


def _plain_logits(module: Any) -> Any:
    """A Hugging Face causal LM returns a ModelOutput and builds a KV cache: wrap it to return
    only logits, with the cache off. Other modules pass through unchanged."""
    import torch

    config = getattr(module, "config", None)
    if config is None or not hasattr(module, "generation_config"):
        return module

    class Logits(torch.nn.Module):
        def __init__(self, lm: Any) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.lm(input_ids=input_ids, use_cache=False).logits

    return Logits(module)
