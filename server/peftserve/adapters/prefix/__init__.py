"""Prefix tuning: per-layer K/V written into a request's first KV blocks by the runner."""

from .loader import load_prefix, prefix_kv_from_embeddings

__all__ = ["load_prefix", "prefix_kv_from_embeddings"]
