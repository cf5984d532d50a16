"""A served model's tokenizer: loaded without the weights, text to ids, ids to each token's text.

One place for what the engine and a cluster's ingress (which holds only the tokenizer) both compute, so
their token ids and token texts cannot drift apart.
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory (its tokenizer files only; never remote code)."""
    return AutoTokenizer.from_pretrained(directory, local_files_only=True, trust_remote_code=False)


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Prompt token ids of text, with the model's special tokens (BOS) as the engine feeds it."""
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def token_strings(tokenizer: PreTrainedTokenizerBase, token_ids: list[int]) -> list[str]:
    """The text of each token on its own."""
    return [tokenizer.decode([t], clean_up_tokenization_spaces=False) for t in token_ids]
