"""The embedded default model: deterministic, atomic, standard HF format, Llama with GQA."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer

from peftserve.model.default_model import DEFAULT_MODEL_NAME, ensure_default_model

HF_FILES = {
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("cache"))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_layout_and_config(default_dir: Path) -> None:
    assert default_dir.name == DEFAULT_MODEL_NAME and default_dir.parent.name == "models"
    assert {p.name for p in default_dir.iterdir()} == HF_FILES
    config = AutoConfig.from_pretrained(default_dir, local_files_only=True)
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers) == (256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads) == (8, 2)
    assert config.max_position_embeddings == 2048 and config.tie_word_embeddings is False
    assert config.vocab_size == 1024


def test_tokenizer_round_trips_and_matches_config(default_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_dir, local_files_only=True)
    config = AutoConfig.from_pretrained(default_dir, local_files_only=True)
    assert len(tokenizer) == config.vocab_size
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config.bos_token_id, config.eos_token_id)
    text = "The server answers: héllo wörld 🚀 \x00\t\n日本語"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode("the model reads a sequence of tokens")) < 20  # merges were learned


def test_builds_are_byte_identical(default_dir: Path, tmp_path: Path) -> None:
    other = ensure_default_model(tmp_path)
    for name in HF_FILES:
        assert sha256(other / name) == sha256(default_dir / name), name


def test_present_model_is_returned_untouched(default_dir: Path) -> None:
    before = (default_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_model(default_dir.parent.parent) == default_dir
    assert (default_dir / "model.safetensors").stat().st_mtime_ns == before
    assert [p.name for p in default_dir.parent.iterdir()] == [DEFAULT_MODEL_NAME]  # no temp dirs left


def test_env_var_picks_the_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PEFTSERVE_CACHE", str(tmp_path))
    assert ensure_default_model() == tmp_path / "models" / DEFAULT_MODEL_NAME


def test_failed_build_leaves_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def boom(directory: Path) -> None:
        (directory / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr("peftserve.model.default_model.build_default_model", boom)
    with pytest.raises(RuntimeError):
        ensure_default_model(tmp_path)
    assert list((tmp_path / "models").iterdir()) == []
