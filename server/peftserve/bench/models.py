"""Seeded random-weight Llama models of the benchmark shapes, and the tokenizer they are served with."""

from __future__ import annotations

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from peftserve.bench.shapes import Shape
from peftserve.model.tokenizer import build_byte_level_tokenizer


def llama_config(shape: Shape, max_positions: int = 2048) -> LlamaConfig:
    """The shape's config; no EOS, so every system generates exactly max_new_tokens."""
    return LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_hidden_layers=shape.layers,
        max_position_embeddings=max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )


def build_model(
    shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> LlamaForCausalLM:
    """A seeded random-weight model of `shape` (sdpa, eval, frozen); weights do not change speed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM._from_config(llama_config(shape), dtype=dtype, attn_implementation="sdpa")
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model.to(device).eval().requires_grad_(False)


def bench_tokenizer() -> PreTrainedTokenizerFast:
    """Any tokenizer works for random ids; ids it lacks decode to nothing."""
    return build_byte_level_tokenizer(1024)
