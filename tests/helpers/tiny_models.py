"""Tiny random-weight models (seeded, fp32, eval) of each family the tests cover, built from configs."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from peftserve.model.tokenizer import build_byte_level_tokenizer, save_tokenizer

FAMILIES = ("llama", "qwen2", "mistral", "gpt2")
TINY_VOCAB = 320
"""256 byte tokens, 3 specials and a few merges."""
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 512


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
    common = dict(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        **ids,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=None, **common)
    raise ValueError(f"unknown tiny family {family!r}; expected one of {', '.join(FAMILIES)}")


def build_tiny_model(family: str, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A seeded random `family` model (fp32, eval, sdpa) and its tokenizer; global RNG left untouched."""
    tokenizer = tiny_tokenizer()
    config = tiny_config(family, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
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
