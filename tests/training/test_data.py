"""JSONL records to token ids and labels; every kind of bad data gives a clear InvalidRequest."""

from __future__ import annotations

import pytest
import torch

from peftserve.errors import InvalidRequest
from peftserve.training.data import IGNORE_INDEX, BatchOrder, collate, load_dataset
from tests.helpers.tiny_models import tiny_tokenizer

from .conftest import write_jsonl

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def test_prompt_completion_loss_on_completion_plus_eos(tmp_path, tokenizer):
    data = load_dataset(
        write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Hi", "completion": " there"}]), tokenizer, 64
    )
    (example,) = data.examples
    prompt = tokenizer("Hi", add_special_tokens=True)["input_ids"]
    completion = tokenizer(" there", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert list(example.input_ids) == prompt + completion
    assert list(example.labels) == [IGNORE_INDEX] * len(prompt) + completion
    assert example.line == 1 and data.skipped == 0 and len(data.digest) == 64


def test_text_records_train_on_every_token(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}])
    (example,) = load_dataset(path, tokenizer, 64).examples
    assert example.labels == example.input_ids and example.input_ids[-1] == tokenizer.eos_token_id


def test_messages_use_the_chat_template_and_train_on_assistant_turns(tmp_path):
    tokenizer = tiny_tokenizer()  # its own copy: the module's tokenizer has no template
    tokenizer.chat_template = CHAT_TEMPLATE
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Ciao"},
    ]
    (example,) = load_dataset(
        write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}]), tokenizer, 256
    ).examples
    trained = tokenizer.decode(
        [t for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE_INDEX]
    )
    assert trained == "Hello</s>Ciao</s>"  # the template's own EOS ends each turn: none appended
    assert tokenizer.decode(example.input_ids) == tokenizer.apply_chat_template(messages, tokenize=False)


def test_messages_without_a_chat_template_are_refused(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    with pytest.raises(InvalidRequest, match=r"d.jsonl:1: 'messages' needs a chat template"):
        load_dataset(path, tokenizer, 64)


def test_long_examples_are_skipped_and_all_too_long_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "short"}, {"text": "a much longer line of text " * 4}])
    data = load_dataset(path, tokenizer, 8)
    assert (len(data), data.skipped) == (1, 1)
    with pytest.raises(InvalidRequest, match=r"all 2 examples of .* are longer than max_length=2 tokens"):
        load_dataset(path, tokenizer, 2)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"does not exist"),
        ("", r"has no examples"),
        ("\n  \n", r"has no examples"),
        ('{"text": "ok"}\n{"text": "broken"\n', r"d.jsonl:2: not valid JSON"),
        ('{"text": "ok"}\n\n[1, 2]\n', r"d.jsonl:3: expected a JSON object, got list"),
        ('{"prompt": "p"}\n', r"d.jsonl:1: missing field 'completion'"),
        ('{"prompt": "p", "completion": 3}\n', r"d.jsonl:1: 'completion' must be a string, got int"),
        (
            '{"input": "p", "output": "q"}\n',
            r"d.jsonl:1: expected 'prompt' and 'completion', 'text', or 'messages'",
        ),
        ('{"text": ""}\n', r"d.jsonl:1: 'text' is empty"),
    ],
)
def test_bad_data_names_the_file_and_line(tmp_path, tokenizer, content, message):
    path = tmp_path / "d.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidRequest, match=message):
        load_dataset(path, tokenizer, 64)


def test_invalid_utf8_names_its_line(tmp_path, tokenizer):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(InvalidRequest, match=r"d.jsonl:2: not valid UTF-8"):
        load_dataset(path, tokenizer, 64)


def test_batch_order_is_a_seeded_shuffle_per_epoch():
    order = BatchOrder(num_examples=5, batch_size=2, seed=3)
    epoch0 = [order.batch(s) for s in range(3)]
    epoch1 = [order.batch(s) for s in range(3, 6)]
    assert [len(b) for b in epoch0] == [2, 2, 1]
    assert sorted(sum(epoch0, [])) == sorted(sum(epoch1, [])) == list(range(5))
    assert (
        BatchOrder(5, 2, 3).batch(4) == epoch1[1]
    )  # any step, recomputed from scratch: what resume relies on
    assert epoch0 != epoch1


def test_collate_right_pads_and_masks_labels(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"text": "longer text"}])
    examples = list(load_dataset(path, tokenizer, 64).examples)
    batch = collate(examples, pad_id=0, device=torch.device("cpu"))
    short = len(examples[0].input_ids)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (
        batch["attention_mask"][0, short:].sum() == 0 and (batch["labels"][0, short:] == IGNORE_INDEX).all()
    )
