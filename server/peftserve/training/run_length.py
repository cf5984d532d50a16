"""How long a run is: the number of epochs chosen from the dataset's size, as hosted fine-tuning does.

Without --epochs or --max-steps, a run takes DEFAULT_EPOCHS passes over the data, more for a small
dataset so that it makes at least MIN_STEPS optimizer steps (six examples in batches of 8 make one step
an epoch: 3 epochs would be 3 steps, which teaches an adapter nothing), fewer for a large one so that
it makes at most MAX_STEPS (but always at least one epoch). It evaluates EVALS_PER_RUN times along the
way and stops early after `early_stopping` evaluations without improvement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEFAULT_EPOCHS = 3
MIN_STEPS = 150
"""Measured on the embedded default model: six prompt/completion pairs need 100-150 full-batch steps
at the methods' default learning rates to be reproduced greedily (benchmarks/README.md)."""
MAX_STEPS = 5000
EVALS_PER_RUN = 20


@dataclass(frozen=True)
class RunLength:
    """The run's length and evaluation cadence, and how they were chosen."""

    total_steps: int
    steps_per_epoch: int
    epochs: int | None
    """None when the run is max_steps long."""
    eval_every: int
    """Optimizer steps between evaluations (the last step is always evaluated)."""
    early_stopping: int
    """Evaluations without improvement before the run stops (0: it never stops early)."""
    chosen: str
    """What was chosen and why, for a person."""


def choose_length(
    num_examples: int,
    batch_size: int,
    epochs: int | None,
    max_steps: int | None,
    eval_every: int | None,
    early_stopping: int,
) -> RunLength:
    """The run's length: max_steps when given, else `epochs` epochs, else epochs chosen from the data."""
    per_epoch = math.ceil(num_examples / batch_size)
    steps = "step" if per_epoch == 1 else "steps"
    shape = f"{num_examples} examples in batches of {batch_size}: {per_epoch} {steps} an epoch"
    if max_steps is not None:
        total, chosen_epochs = max_steps, None
        chosen = f"{max_steps} steps (--max-steps); {shape}"
    elif epochs is not None:
        total, chosen_epochs = epochs * per_epoch, epochs
        chosen = f"{epochs} epochs (--epochs) = {total} steps; {shape}"
    else:
        chosen_epochs = DEFAULT_EPOCHS
        if chosen_epochs * per_epoch < MIN_STEPS:
            chosen_epochs = math.ceil(MIN_STEPS / per_epoch)
            why = f"at least {MIN_STEPS} steps"
        elif chosen_epochs * per_epoch > MAX_STEPS:
            chosen_epochs = max(1, MAX_STEPS // per_epoch)
            why = f"at most {MAX_STEPS} steps, at least one epoch"
        else:
            why = f"the default {DEFAULT_EPOCHS}"
        total = chosen_epochs * per_epoch
        chosen = f"{chosen_epochs} epochs ({why}) = {total} steps; {shape}"
    every = eval_every or max(1, math.ceil(total / EVALS_PER_RUN))
    patience = early_stopping if max_steps is None else 0
    stop = f", stopping after {patience} without improvement" if patience else ""
    chosen += f"; evaluating every {every} steps{stop}"
    return RunLength(total, per_epoch, chosen_epochs, every, patience, chosen)
