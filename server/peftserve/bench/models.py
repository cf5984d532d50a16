"""Seeded random-weight models of the benchmark shapes, and the tokenizer they are served with."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GenerationConfig,
    LlamaConfig,
    MixtralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

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


def family_config(shape: Shape, max_positions: int = 2048) -> PretrainedConfig:
    """The shape's config in its family; like llama_config, no EOS."""
    common = dict(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_hidden_layers=shape.layers,
        head_dim=shape.head_dim,
        max_position_embeddings=max_positions,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    if shape.family == "llama":
        return llama_config(shape, max_positions)
    if shape.family == "gemma2":  # Gemma-2-2B's attention: soft-caps, window, query_pre_attn_scalar
        return Gemma2Config(
            **common,
            query_pre_attn_scalar=shape.head_dim,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    if shape.family == "mixtral":
        return MixtralConfig(
            **common,
            num_local_experts=shape.experts,
            num_experts_per_tok=shape.experts_per_token,
            tie_word_embeddings=False,
        )
    raise ValueError(f"no benchmark config for family {shape.family!r}")


def build_model(
    shape: Shape, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> PreTrainedModel:
    """A seeded random-weight model of `shape` (eval, frozen; sdpa, or eager where the family has no
    sdpa); weights do not change speed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(family_config(shape), dtype=dtype)
    model.generation_config = GenerationConfig(pad_token_id=0)
    return model.to(device).eval().requires_grad_(False)


def bench_tokenizer() -> PreTrainedTokenizerFast:
    """Any tokenizer works for random ids; ids it lacks decode to nothing."""
    return build_byte_level_tokenizer(1024)
