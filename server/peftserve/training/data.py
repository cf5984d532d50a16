"""Training data: JSONL records to token ids with loss labels (errors name file and line), and batches.

A line is one JSON object with either
- `prompt` and `completion`: loss on the completion only, EOS appended to it;
- `text`: loss on every token, EOS appended;
- `messages` (list of {role, content}): rendered with the tokenizer's chat template, loss on the
  assistant turns only.

Prompt and completion are tokenized separately, the prompt exactly as the server tokenizes a request
(`add_special_tokens=True`), so a trained completion is what greedy decoding of that prompt reproduces.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from peftserve.errors import InvalidRequest

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of tokens that carry no loss (transformers' convention)."""


@dataclass(frozen=True)
class Segment:
    """A piece of an example's text, tokenized on its own."""

    text: str
    loss: bool
    """Whether its tokens are trained on."""
    special: bool = False
    """Let the tokenizer add its special tokens (BOS) as it does for a served prompt."""


@dataclass(frozen=True)
class Example:
    """One tokenized training example."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    """input_ids where loss is taken, IGNORE_INDEX elsewhere (same length)."""
    line: int
    """1-based line of the JSONL file."""


@dataclass(frozen=True)
class Dataset:
    """The usable examples of a JSONL file."""

    path: str
    examples: tuple[Example, ...]
    skipped: int
    """Examples longer than max_length, left out."""
    digest: str
    """sha256 of the file's bytes (checkpoints refuse to resume on different data)."""

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def load_dataset(path: str | Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Read, validate and tokenize a JSONL file; InvalidRequest says which line is wrong and why."""
    file = Path(path)
    if not file.is_file():
        raise InvalidRequest(
            f"data file {str(path)!r} does not exist" if not file.exists() else f"{path} is not a file"
        )
    raw = file.read_bytes()
    records = parse_jsonl(raw, str(path))
    if not records:
        raise InvalidRequest(f"{path} has no examples (the file is empty or has only blank lines)")
    examples: list[Example] = []
    too_long: list[int] = []
    for line, record in records:
        ids, labels = encode_record(record, tokenizer, f"{path}:{line}")
        if len(ids) > max_length:
            too_long.append(len(ids))
        else:
            examples.append(Example(tuple(ids), tuple(labels), line))
    if not examples:
        raise InvalidRequest(
            f"all {len(records)} examples of {path} are longer than max_length={max_length} tokens "
            f"(the shortest has {min(too_long)}); raise --max-length"
        )
    if too_long:
        log.warning(
            "%s: skipped %d of %d examples longer than max_length=%d tokens (longest %d)",
            path,
            len(too_long),
            len(records),
            max_length,
            max(too_long),
        )
    digest = hashlib.sha256(raw).hexdigest()
    return Dataset(path=str(path), examples=tuple(examples), skipped=len(too_long), digest=digest)


def parse_jsonl(raw: bytes, where: str) -> list[tuple[int, Any]]:
    """(line number, parsed value) of every non-blank line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InvalidRequest(f"{where}:{line}: not valid UTF-8") from exc
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise InvalidRequest(
                f"{where}:{number}: not valid JSON ({exc.msg} at column {exc.colno})"
            ) from exc
    return records


def encode_record(record: Any, tokenizer: PreTrainedTokenizerBase, where: str) -> tuple[list[int], list[int]]:
    """Token ids and labels of one record."""
    if not isinstance(record, dict):
        raise InvalidRequest(f"{where}: expected a JSON object, got {type(record).__name__}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InvalidRequest("the tokenizer has no eos_token, so the end of a completion cannot be marked")
    if "messages" in record:
        segments = chat_segments(record["messages"], tokenizer, where)
    elif "prompt" in record or "completion" in record:
        prompt = _string(record, "prompt", where)
        completion = _string(record, "completion", where)
        segments = [Segment(prompt, loss=False, special=True), Segment(completion, loss=True)]
    elif "text" in record:
        text = _string(record, "text", where)
        if not text:
            raise InvalidRequest(f"{where}: 'text' is empty")
        segments = [Segment(text, loss=True, special=True)]
    else:
        raise InvalidRequest(
            f"{where}: expected 'prompt' and 'completion', 'text', or 'messages' fields; got {sorted(record)}"
        )
    ids: list[int] = []
    labels: list[int] = []
    last_loss_piece: list[int] = []
    for segment in segments:
        piece = tokenizer(segment.text, add_special_tokens=segment.special)["input_ids"]
        ids += piece
        labels += piece if segment.loss else [IGNORE_INDEX] * len(piece)
        if segment.loss:
            last_loss_piece = piece
    if eos not in last_loss_piece:  # chat templates usually end a turn with EOS themselves
        ids.append(eos)
        labels.append(eos)
    return ids, labels


def chat_segments(messages: Any, tokenizer: PreTrainedTokenizerBase, where: str) -> list[Segment]:
    """The conversation rendered by the chat template, split so that only assistant turns carry loss."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(
            f"{where}: 'messages' needs a chat template, but this tokenizer has none; "
            "give 'prompt'/'completion' or 'text' records instead"
        )
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for i, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise InvalidRequest(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
    if not any(m["role"] == "assistant" for m in messages):
        raise InvalidRequest(f"{where}: 'messages' has no assistant message to learn")
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, where)
        after = _render(tokenizer, messages[: i + 1], False, where)
        if not before.startswith(done) or not after.startswith(before):
            raise InvalidRequest(
                f"{where}: the chat template does not render this conversation turn by turn "
                "(a rendered prefix changes when a message is added), so assistant turns cannot be isolated"
            )
        segments += [Segment(before[len(done) :], loss=False), Segment(after[len(before) :], loss=True)]
        done = after
    return segments


def _render(tokenizer: PreTrainedTokenizerBase, messages: list, generation_prompt: bool, where: str) -> str:
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja raises its own errors from the template (e.g. on role order)
        raise InvalidRequest(f"{where}: the chat template failed on these messages: {exc}") from exc
    return text if isinstance(text, str) else str(text)


def _string(record: dict, name: str, where: str) -> str:
    if name not in record:
        raise InvalidRequest(f"{where}: missing field {name!r}")
    if not isinstance(record[name], str):
        raise InvalidRequest(f"{where}: {name!r} must be a string, got {type(record[name]).__name__}")
    return record[name]


class BatchOrder:
    """Which examples form each global step's batch: a seeded shuffle per epoch, last batch smaller.

    Derived from (seed, epoch) alone, so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.steps_per_epoch = math.ceil(num_examples / batch_size)
        self._epoch = -1
        self._order: list[int] = []

    def batch(self, step: int) -> list[int]:
        """Example indices of optimizer step `step` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._order = torch.randperm(self.num_examples, generator=generator).tolist()
            self._epoch = epoch
        return self._order[k * self.batch_size : (k + 1) * self.batch_size]


def collate(examples: list[Example], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels, each [B, S]."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # [B, S]
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)  # [B, S]
    mask = torch.zeros((len(examples), width), dtype=torch.long)  # [B, S]
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
