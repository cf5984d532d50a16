"""Fixtures of the runner's tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture
def model_dir(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny llama, whose files a test may change."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))
