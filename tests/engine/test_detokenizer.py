"""Incremental detokenization: deltas concatenate to the text; stop strings are held back and cut."""

from __future__ import annotations

import pytest

from peftserve.engine.detokenizer import IncrementalDetokenizer
from tests.helpers.tiny_models import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def feed(detok, ids):
    return [detok.add(t) for t in ids]


def test_deltas_concatenate_to_the_decoded_text_including_multibyte_characters(tokenizer):
    text = "héllo wörld 🚀 done"
    ids = tokenizer(text)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=tokenizer("prompt: ")["input_ids"])
    deltas = feed(detok, ids)
    assert "".join(deltas) + detok.flush() == text
    assert all("\ufffd" not in d for d in deltas)


def test_stop_string_spanning_tokens_is_cut_and_never_emitted(tokenizer):
    ids = tokenizer("abc STOP def")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop=("STOP",))
    emitted = ""
    for t in ids:
        emitted += detok.add(t)
        assert "STO" not in emitted
        if detok.stopped:
            break
    assert detok.stopped and emitted + detok.flush() == "abc "


def test_held_back_text_is_released_at_the_end(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids=[], stop=("never",))
    emitted = "".join(feed(detok, tokenizer("the end")["input_ids"]))
    assert emitted != "the end"  # the tail could still begin "never"
    assert emitted + detok.flush() == "the end"
