"""The embedded default model: a small seeded Llama built locally, so the server runs with no download."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from peftserve.model.chat import DEFAULT_CHAT_TEMPLATE
from peftserve.model.tokenizer import build_byte_level_tokenizer, save_tokenizer

DEFAULT_MODEL_NAME = "default-v2"
"""Bump the suffix whenever anything below changes what gets built."""
SEED = 1234
VOCAB_SIZE = 1024


def cache_root() -> Path:
    """$PEFTSERVE_CACHE, or ~/.cache/peftserve."""
    return Path(os.environ.get("PEFTSERVE_CACHE") or Path.home() / ".cache" / "peftserve").expanduser()


def default_model_config(vocab_size: int = VOCAB_SIZE) -> LlamaConfig:
    """Llama architecture (GQA, RoPE, SwiGLU), 4 layers of hidden 256: about 3.4M parameters."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )


def build_default_model(directory: Path) -> None:
    """Write the default model (config, generation config, weights, tokenizer) into `directory`."""
    tokenizer = build_byte_level_tokenizer(VOCAB_SIZE)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    config = default_model_config(len(tokenizer))
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (
        config.pad_token_id,
        config.bos_token_id,
        config.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(directory)
    save_tokenizer(tokenizer, directory)


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return `<cache_dir or cache_root()>/models/<DEFAULT_MODEL_NAME>`, building it first if it is absent."""
    final = Path(cache_dir or cache_root()) / "models" / DEFAULT_MODEL_NAME
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent builder never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}-", dir=final.parent))
    try:
        build_default_model(tmp)
        os.rename(tmp, final)
    except OSError:
        if not (final / "config.json").is_file():
            raise
        # Another process won the race; its copy is identical.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
