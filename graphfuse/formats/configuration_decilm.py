"""The configuration of a nemotron-nas (DeciLM) checkpoint, shipped in the checkpoint's folder
(``auto_map``) so that ``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` works
offline. Written by graphfuse; it needs nothing but transformers.

``block_configs`` is a list of dicts, one per layer: ``{"attention": {"no_op", "n_heads_in_group",
"replace_with_linear"}, "ffn": {"no_op", "ffn_mult"}}``. Readers such as vLLM take them by
attribute (``config.block_configs[i].ffn.ffn_mult``), and ``hasattr`` must be false for a key that
is absent; serialised, they must stay plain JSON. A dict that answers attribute look-ups does both.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig


class BlockSection(dict):
    """A ``block_configs`` entry: a plain dict, readable by attribute."""

    def __getattr__(self, name: str) -> Any:
        try:
            value = self[name]
        except KeyError:
            raise AttributeError(name) from None
        return BlockSection(value) if isinstance(value, dict) else value


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs: list[dict] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.block_configs = [BlockSection(b) for b in block_configs or []]
