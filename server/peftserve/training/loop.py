"""The optimization loop: one named step at a time, with progress, checkpoints, and evaluation."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from tqdm import tqdm

from peftserve.training.data import IGNORE_INDEX, BatchOrder, Example, collate
from peftserve.training.methods import TrainingMethod


@dataclass(frozen=True)
class Schedule:
    """Length and learning rate of a run."""

    total_steps: int
    peak_lr: float
    warmup_steps: int = 0
    kind: str = "linear"
    """linear: decay to 0 after warm-up; constant: hold."""

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        return self.peak_lr * (self.total_steps - step) / max(1, self.total_steps - self.warmup_steps)


MIN_IMPROVEMENT = 1e-3
"""An evaluation improves on the best one when its loss is lower by more than this (nats)."""


@dataclass
class LoopState:
    """What the loop accumulates; checkpointed so a resumed run reports the same numbers."""

    step: int = 0
    """Optimizer steps done."""
    tokens: int = 0
    """Non-padding tokens fed over the whole run."""
    recent_losses: deque[float] | None = None
    """Training losses of the last steps (up to one epoch), for the final train loss."""
    eval_loss: float | None = None
    """The last evaluation's loss."""
    best_loss: float | None = None
    best_step: int = 0
    """The step of the best evaluation (whose parameters are in `best`)."""
    evals_without_improvement: int = 0
    stopped_early: bool = False
    best: dict[str, torch.Tensor] | None = None
    """The trainable parameters at the best evaluation."""

    def record_eval(self, loss: float, params: dict[str, torch.nn.Parameter]) -> None:
        """Take in an evaluation; a new best keeps a copy of the parameters."""
        self.eval_loss = loss
        if self.best_loss is None or loss < self.best_loss - MIN_IMPROVEMENT:
            self.best_loss, self.best_step, self.evals_without_improvement = loss, self.step, 0
            self.best = {name: p.detach().clone() for name, p in params.items()}
        else:
            self.evals_without_improvement += 1

    def meta(self) -> dict:
        """The JSON part, for checkpoints (`best` goes with the tensors)."""
        return {
            "tokens": self.tokens,
            "recent_losses": list(self.recent_losses or []),
            "eval_loss": self.eval_loss,
            "best_loss": self.best_loss,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
        }


@dataclass(frozen=True)
class Evaluation:
    """When and how the loop evaluates, and when it stops early."""

    loss: Callable[[], float]
    """The eval loss of the model as it is (leaving it in the mode it found it in)."""
    every: int
    """Steps between evaluations; the last step is always evaluated."""
    patience: int = 0
    """Evaluations without improvement that stop the run (0: never)."""

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps


@dataclass(frozen=True)
class LoopStats:
    """Timing of the part of the run this process did."""

    steps: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def train_step(
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batch: dict[str, torch.Tensor],
    lr: float,
    max_grad_norm: float | None,
) -> float:
    """Forward, backward, clip, optimizer step; gradients are left for the method's hook. Returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = model(**batch).loss  # mean over label tokens (+ AdaLoRA's orthogonality term)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    return float(loss.detach())


def run(
    model: PeftModel,
    method: TrainingMethod,
    optimizer: torch.optim.Optimizer,
    examples: Sequence[Example],
    order: BatchOrder,
    schedule: Schedule,
    state: LoopState,
    *,
    pad_id: int,
    device: torch.device,
    max_grad_norm: float | None,
    progress: bool,
    evaluation: Evaluation | None = None,
    on_step: Callable[[LoopState], None] | None = None,
) -> LoopStats:
    """Train from state.step to schedule.total_steps, evaluating on the way (and stopping early when
    evaluation says so); `on_step` runs after each step and its evaluation (checkpoints)."""
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    params = list(named.values())
    state.recent_losses = deque(state.recent_losses or (), maxlen=order.steps_per_epoch)
    model.train()
    start_step, start_tokens, started = state.step, state.tokens, time.perf_counter()
    bar = tqdm(
        total=schedule.total_steps,
        initial=state.step,
        disable=not progress,
        desc=f"train {method.options.name}",
        unit="step",
        dynamic_ncols=True,
    )
    with bar:
        while state.step < schedule.total_steps:
            batch = collate([examples[i] for i in order.batch(state.step)], pad_id, device)
            loss = train_step(model, optimizer, params, batch, schedule.lr(state.step), max_grad_norm)
            method.after_optimizer_step(model, state.step)
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens += int(batch["attention_mask"].sum())
            state.recent_losses.append(loss)
            if evaluation is not None and evaluation.due(state.step, schedule.total_steps):
                state.record_eval(evaluation.loss(), named)
                stop = evaluation.patience and state.evals_without_improvement >= evaluation.patience
                state.stopped_early = bool(stop) and state.step < schedule.total_steps
            elapsed = time.perf_counter() - started
            rate = (state.tokens - start_tokens) / elapsed if elapsed > 0 else 0.0
            postfix = {"loss": f"{loss:.4f}"}
            if state.eval_loss is not None:
                postfix["eval"] = f"{state.eval_loss:.4f}"
                postfix["best"] = f"{state.best_loss:.4f}@{state.best_step}"
            bar.set_postfix(**postfix, tok_s=f"{rate:,.0f}", refresh=False)
            bar.update(1)
            if on_step is not None:
                on_step(state)
            if state.stopped_early:
                break
    model.eval()
    return LoopStats(state.step - start_step, state.tokens - start_tokens, time.perf_counter() - started)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, examples: Sequence[Example], batch_size: int, pad_id: int, device: torch.device
) -> float:
    """Mean cross-entropy per label token (nats) over `examples`, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(list(examples[start : start + batch_size]), pad_id, device)
        labels = batch.pop("labels")[:, 1:]  # [B, S-1]: token t+1 is predicted at t
        logits = model(**batch).logits[:, :-1].float()  # [B, S-1, V]
        total += float(
            F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum")
        )
        count += int((labels != IGNORE_INDEX).sum())
    model.train(was_training)
    return total / max(count, 1)
