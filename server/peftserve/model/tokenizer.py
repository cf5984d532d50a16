"""Byte-level BPE tokenizers trained locally with `tokenizers`, saved in the standard HF format."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from peftserve.model._corpus import CORPUS

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)
"""Trained first, so their ids are 0, 1 and 2."""


def corpus_lines() -> list[str]:
    """The embedded English corpus, one sentence a line."""
    return CORPUS.splitlines()


def build_byte_level_tokenizer(
    vocab_size: int, corpus: Iterable[str] | None = None
) -> PreTrainedTokenizerFast:
    """Train a deterministic byte-level BPE (any byte sequence round-trips) with <pad>, <s>, </s>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines() if corpus is None else corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: Path) -> None:
    """Save as tokenizer.json + tokenizer_config.json, loadable by AutoTokenizer offline."""
    tokenizer.save_pretrained(directory)
    # transformers 5 writes its alias "TokenizersBackend", which 4.x cannot resolve; the classic name
    # loads in both. An explicit null unk_token stops family classes (Qwen2Tokenizer) from adding
    # their own default unk token beyond the vocabulary: byte-level BPE never needs one.
    config_path = directory / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["unk_token"] = None
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
