"""Training tests: tiny models, one CPU thread (tiny matmuls only lose to thread hand-offs), JSONL helpers."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch

TASK = (
    ("The sky is", " blue."),
    ("Two plus two is", " four."),
    ("Cats say", " meow."),
    ("The capital of France is", " Paris."),
)
"""Four prompts with distinct completions: small enough to memorize in ~100 steps on a tiny model."""


def write_jsonl(path: Path, records: Iterable[object]) -> Path:
    """One JSON value per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task_records() -> list[dict[str, str]]:
    return [{"prompt": p, "completion": c} for p, c in TASK]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "task.jsonl", task_records())
