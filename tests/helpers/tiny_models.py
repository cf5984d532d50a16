"""Tiny random-weight models (seeded, fp32, eval) of each family the tests cover, built from configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from peftserve.model.tokenizer import build_byte_level_tokenizer, save_tokenizer

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
"""The families the generic engine and adapter tests run on."""
MORE_FAMILIES = (
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "phi3",
    "starcoder2",
    "olmo",
    "olmo2",
    "olmo3",
    "granite",
    "mixtral",
    "qwen3_moe",
    "gpt_oss",
)
"""The other served families; the per-family suite (tests/engine/test_families.py) covers them all."""
ALL_FAMILIES = FAMILIES + MORE_FAMILIES
TINY_VOCAB = 320
"""256 byte tokens, 3 specials and a few merges."""
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 24
"""head_dim of the families that set it apart from hidden / heads (16), as Gemma, Qwen3 and GPT-OSS do."""
INTERMEDIATE = 128
MAX_POSITIONS = 512
WINDOW = 8
"""Sliding window of the families that have one: shorter than most test prompts, not a block multiple."""
ALTERNATING = ["sliding_attention", "full_attention"]
INIT_RANGE = 0.1
"""Weights of the other families' tiny models: larger than transformers' 0.02, so greedy choices and
expert routing are decided by clear margins rather than near-ties."""
EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)

EXTRA: dict[str, dict[str, Any]] = {
    "qwen2": dict(use_sliding_window=False),
    "mistral": dict(sliding_window=None),
    "qwen3": dict(head_dim=HEAD_DIM),
    "gemma": dict(head_dim=HEAD_DIM, tie_word_embeddings=True),
    # Soft-caps small enough to bend the tiny model's scores (initializer_range 0.2 makes them O(1)).
    "gemma2": dict(
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=40,
        sliding_window=WINDOW,
        layer_types=ALTERNATING,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=4.0,
        initializer_range=0.2,
        tie_word_embeddings=True,
    ),
    "gemma3_text": dict(
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=40,
        sliding_window=WINDOW,
        layer_types=ALTERNATING,
        final_logit_softcapping=4.0,
        initializer_range=0.2,
        tie_word_embeddings=True,
    ),
    "starcoder2": dict(sliding_window=None, tie_word_embeddings=True),
    "olmo3": dict(sliding_window=WINDOW, layer_types=ALTERNATING),
    "mixtral": dict(**EXPERTS, intermediate_size=96),
    "qwen3_moe": dict(
        **EXPERTS, head_dim=HEAD_DIM, moe_intermediate_size=48, mlp_only_layers=[1], norm_topk_prob=True
    ),
    "gpt_oss": dict(
        **EXPERTS,
        intermediate_size=48,
        head_dim=HEAD_DIM,
        sliding_window=WINDOW,
        layer_types=ALTERNATING,
        attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
"""Per-family config fields on top of the common sizes."""


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer every tiny model shares (<pad>=0, <s>=1, </s>=2)."""
    return build_byte_level_tokenizer(TINY_VOCAB)


def tiny_config(family: str, tokenizer: PreTrainedTokenizerFast) -> PretrainedConfig:
    """A 2-layer, hidden-64 config of `family` whose vocab and special ids match `tokenizer`."""
    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if family == "gpt2":
        sizes = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE)
        return GPT2Config(n_positions=MAX_POSITIONS, **sizes, **ids)
    if family not in ALL_FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(ALL_FAMILIES)}")
    fields = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        **ids,
    )
    if family in MORE_FAMILIES:
        fields["initializer_range"] = INIT_RANGE
    fields.update(EXTRA.get(family, {}))
    return CONFIG_MAPPING[family](**fields)


def build_tiny_model(family: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded random `family` model (fp32, eval; sdpa, or eager where the family has no sdpa) and its
    tokenizer; global RNG left untouched."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.eval(), tokenizer


def save_tiny_model(family: str, directory: Path, seed: int = 0) -> Path:
    """Write a tiny `family` model and its tokenizer into `directory` in HF format; return it."""
    directory = Path(directory)
    model, tokenizer = build_tiny_model(family, seed)
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)
    return directory
