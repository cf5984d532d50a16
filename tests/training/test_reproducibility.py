"""Same seed, same adapter bytes; a run resumed from a checkpoint ends where an uninterrupted run does."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from peftserve.errors import InvalidRequest
from peftserve.training import AdaLoraOptions, LoraOptions, PrefixOptions, SparseOptions, TrainConfig, train
from peftserve.training.checkpoint import checkpoint_dirs


def adapter_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def config(data: Path, base: Path, out: Path, method, **overrides) -> TrainConfig:
    fields = dict(data=str(data), base=str(base), method=method, max_steps=12, lr=1e-2, batch_size=2)
    return TrainConfig(**{**fields, "out_dir": str(out), "progress": False, **overrides})


@pytest.mark.parametrize(
    "method",
    [
        LoraOptions(rank=4, dropout=0.1),
        PrefixOptions(num_virtual_tokens=4, projection=True, encoder_hidden_size=16),
    ],
    ids=["lora-dropout", "prefix-projection"],
)
def test_same_seed_gives_byte_identical_adapters(tmp_path, tiny_llama_dir, task_file, method):
    first = train(config(task_file, tiny_llama_dir, tmp_path / "a", method, seed=7))
    second = train(config(task_file, tiny_llama_dir, tmp_path / "b", method, seed=7))
    other = train(config(task_file, tiny_llama_dir, tmp_path / "c", method, seed=8))
    assert adapter_bytes(first.output_dir) == adapter_bytes(second.output_dir)
    assert set(adapter_bytes(first.output_dir)) >= {"adapter_config.json", "adapter_model.safetensors"}
    assert (
        adapter_bytes(first.output_dir)["adapter_model.safetensors"]
        != adapter_bytes(other.output_dir)["adapter_model.safetensors"]
    )


@pytest.mark.parametrize(
    "method",
    [
        AdaLoraOptions(init_r=4, target_r=2, dropout=0.1, tinit=2, tfinal=3, delta_t=2),
        SparseOptions(budget=1),
    ],
    ids=["adalora", "sparse"],
)
def test_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path, tiny_llama_dir, task_file, method):
    run = dict(checkpoint_every=4, keep_checkpoints=5)
    whole = train(
        config(
            task_file, tiny_llama_dir, tmp_path / "whole", method, checkpoint_dir=str(tmp_path / "c1"), **run
        )
    )
    steps = [int(p.name.split("-")[1]) for p in checkpoint_dirs(tmp_path / "c1")]
    assert steps == [4, 8, 12]
    # A run that "crashed" after step 4: only its first checkpoint exists.
    shutil.copytree(tmp_path / "c1" / "step-00000004", tmp_path / "c2" / "step-00000004")
    resumed = train(
        config(
            task_file,
            tiny_llama_dir,
            tmp_path / "resumed",
            method,
            checkpoint_dir=str(tmp_path / "c2"),
            resume=True,
            **run,
        )
    )
    assert adapter_bytes(resumed.output_dir) == adapter_bytes(whole.output_dir)
    same = ("steps", "train_loss", "eval_loss_before", "eval_loss_after", "trainable_params")
    assert {k: getattr(resumed, k) for k in same} == {k: getattr(whole, k) for k in same}
    assert resumed.tokens < whole.tokens  # it really skipped the first 4 steps


def test_resume_refuses_a_checkpoint_of_different_settings(tmp_path, tiny_llama_dir, task_file):
    method = LoraOptions(rank=2)
    train(
        config(
            task_file, tiny_llama_dir, tmp_path / "a", method, checkpoint_dir=str(tmp_path / "c"), max_steps=2
        )
    )
    changed = config(
        task_file, tiny_llama_dir, tmp_path / "b", method, checkpoint_dir=str(tmp_path / "c"), resume=True
    )
    with pytest.raises(InvalidRequest, match=r"different run \(run differ\)"):
        train(dataclasses.replace(changed, max_steps=3))


def test_resume_without_a_checkpoint_starts_from_zero(tmp_path, tiny_llama_dir, task_file):
    fresh = config(task_file, tiny_llama_dir, tmp_path / "a", LoraOptions(rank=2), max_steps=2)
    result = train(dataclasses.replace(fresh, checkpoint_dir=str(tmp_path / "none"), resume=True))
    assert result.steps == 2
