"""Attention geometry of a transformers config, derived in one place (engine, runner and adapters use it)."""

from __future__ import annotations

from typing import Any


def text_config(config: Any) -> Any:
    """The config of the language model itself (multimodal configs nest it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def kv_heads(config: Any) -> int:
    """Key/value heads per layer (grouped-query attention), or the attention heads when not grouped."""
    config = text_config(config)
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def head_dim(config: Any) -> int:
    """Size of one attention head: the config's head_dim when it sets one, else hidden / heads."""
    config = text_config(config)
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
