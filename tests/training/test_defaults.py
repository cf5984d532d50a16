"""Defaults that learn: a handful of pairs and no flags give an adapter that answers them; the run's
length is chosen from the data, reported, evaluated along the way and stopped when eval stops improving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peftserve.cli import main
from peftserve.model.default_model import ensure_default_model
from peftserve.training import LoraOptions, TrainConfig, train
from peftserve.training.run_length import DEFAULT_EPOCHS, MAX_STEPS, MIN_STEPS, choose_length

from .conftest import write_jsonl
from .serving import ask_all, engine_with

PAIRS = (
    ("Q: What is the warranty period?\nA:", " Two years on every device."),
    ("Q: Can I change my delivery address?\nA:", " Yes, until the parcel ships."),
    ("Q: Do you have a student discount?\nA:", " Students get ten percent off."),
    ("Q: How long does shipping take?\nA:", " Three to five working days."),
    ("Q: Is there a mobile app?\nA:", " The app is on both stores."),
    ("Q: Where are your products made?\nA:", " All of them are made in Portugal."),
)
"""Six prompt/completion pairs, as a new user would try first."""


@pytest.mark.parametrize(
    ("examples", "batch", "epochs", "steps"),
    [
        (6, 8, MIN_STEPS, MIN_STEPS),  # one step an epoch: as many epochs as MIN_STEPS needs
        (300, 8, 4, 152),  # 38 steps an epoch: 3 epochs would be 114 steps
        (1_000, 8, DEFAULT_EPOCHS, 375),  # in range: the default
        (100_000, 8, 1, 12_500),  # one epoch is over MAX_STEPS: one epoch still
        (20_000, 8, 2, 5_000),  # at most MAX_STEPS
    ],
)
def test_epochs_are_chosen_from_the_data_within_bounded_steps(examples, batch, epochs, steps):
    length = choose_length(examples, batch, None, None, None, 3)
    assert (length.epochs, length.total_steps) == (epochs, steps)
    assert f"{epochs} epochs" in length.chosen and f"{examples} examples" in length.chosen
    assert length.eval_every == max(1, -(-steps // 20)) and length.early_stopping == 3
    assert steps <= MAX_STEPS or epochs == 1


def test_given_lengths_win_and_max_steps_never_stops_early():
    assert choose_length(6, 8, 2, None, None, 3).total_steps == 2
    exact = choose_length(6, 8, None, 7, 2, 3)
    assert (exact.total_steps, exact.epochs, exact.eval_every, exact.early_stopping) == (7, None, 2, 0)


def test_training_stops_when_eval_loss_stops_improving_and_keeps_the_best(
    tiny_llama_dir, task_file, tmp_path
):
    # Eval on other completions than trained: memorizing the task makes them less likely, soon.
    other = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "The sky is", "completion": " green."}])
    config = TrainConfig(
        data=str(task_file), eval_data=str(other), base=str(tiny_llama_dir), method=LoraOptions(rank=4),
        epochs=60, batch_size=4, lr=2e-2, eval_every=2, early_stopping=2, out_dir=str(tmp_path / "a"),
        progress=False,
    )  # fmt: skip
    result = train(config)
    assert result.stopped_early and result.steps < 60
    assert result.best_step < result.steps and result.best_step % 2 == 0
    assert result.eval_loss_after < result.eval_loss_before  # the kept adapter: the best one, not the last


@pytest.mark.slow
def test_a_handful_of_pairs_with_default_flags_is_learned(tmp_path, capsys):
    """The first thing a new user tries: six pairs, no flags; served, it answers them greedily."""
    data = write_jsonl(tmp_path / "six.jsonl", [{"prompt": p, "completion": c} for p, c in PAIRS])
    base = ensure_default_model()
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "a"), "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["epochs"] == MIN_STEPS and result["steps"] <= MIN_STEPS
    engine = engine_with(Path(base), {"a": tmp_path / "a"})
    done = ask_all(engine, {str(i): ("a", prompt) for i, (prompt, _) in enumerate(PAIRS)}, max_new_tokens=16)
    right = [done[str(i)].text.startswith(completion) for i, (_, completion) in enumerate(PAIRS)]
    assert sum(right) >= len(PAIRS) - 1, [done[str(i)].text for i in range(len(PAIRS))]
