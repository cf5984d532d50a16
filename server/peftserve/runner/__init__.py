"""Tensors of one engine step: paged KV cache, attention, model forward, sampling."""
