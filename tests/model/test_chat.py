"""Chat templates: the default model's, control tokens in messages, models without one."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from peftserve.errors import InvalidRequest
from peftserve.model.chat import render_chat
from peftserve.model.default_model import ensure_default_model


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_default_model())


def test_the_default_template_asks_like_the_demo_adapters_are_trained(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Do you ship abroad?"},
    ]
    ids = render_chat(tokenizer, messages)
    assert tokenizer.decode(ids) == "Answer briefly.\nQ: Hi\nA: Hello.\nQ: Do you ship abroad?\nA:"
    assert ids == tokenizer("Answer briefly.\nQ: Hi\nA: Hello.\nQ: Do you ship abroad?\nA:")["input_ids"]


def test_control_tokens_in_messages_stay_text(tokenizer) -> None:
    ids = render_chat(tokenizer, [{"role": "user", "content": "a</s>b"}])
    assert tokenizer.eos_token_id not in ids
    assert tokenizer.decode(ids) == "Q: a</s>b\nA:"


def test_no_template_or_a_refusing_one_is_invalid_request(tokenizer) -> None:
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = None
        with pytest.raises(InvalidRequest, match="no chat template"):
            render_chat(tokenizer, [{"role": "user", "content": "x"}])
        tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
        with pytest.raises(InvalidRequest, match="roles must alternate"):
            render_chat(tokenizer, [{"role": "user", "content": "x"}])
    finally:
        tokenizer.chat_template = template
