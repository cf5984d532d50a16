"""Session-scoped pytest fixtures with one saved tiny model directory per family.

Use them from a conftest with `from tests.helpers.fixtures import tiny_model_dir, tiny_llama_dir  # noqa`
or, suite-wide, `pytest_plugins = ["tests.helpers.fixtures"]` in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers.tiny_models import FAMILIES, save_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`tiny_model_dir(family) -> Path`: the family's saved tiny model, built once per session."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            cache[family] = save_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="session", params=FAMILIES)
def tiny_family_dir(request: pytest.FixtureRequest, tiny_model_dir: Callable[[str], Path]) -> Path:
    """Each family's tiny model directory in turn (parametrizes the test over FAMILIES)."""
    return tiny_model_dir(request.param)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("mistral")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("gpt2")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """torch on one thread for the test: tiny tensors run faster, and on a shared machine two threads'
    OpenMP spinning can slow small matmuls tenfold. Use with pytest.mark.usefixtures."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
