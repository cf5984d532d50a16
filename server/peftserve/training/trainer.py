"""train(config): base model + JSONL data -> a PEFT adapter directory the server serves exactly."""

from __future__ import annotations

import dataclasses
import json
import logging
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from peftserve.errors import InvalidRequest
from peftserve.model.loader import load_base_model
from peftserve.training import checkpoint as ckpt
from peftserve.training.config import PrefixOptions, TrainConfig
from peftserve.training.data import BatchOrder, Dataset, Example, load_dataset
from peftserve.training.loop import Evaluation, LoopState, Schedule, evaluate, run
from peftserve.training.methods import BuildContext, TrainingMethod, method_for
from peftserve.training.run_length import RunLength, choose_length

log = logging.getLogger(__name__)

TRAIN_EVAL_EXAMPLES = 256
"""Without an eval file, the loss before and after is measured on this many training examples."""


@dataclass(frozen=True)
class TrainResult:
    """What a run produced and measured."""

    method: str
    output_dir: Path | None
    """The PEFT adapter directory, or None when it was not saved."""
    steps: int
    """Optimizer steps of the run (including those done before a resume)."""
    epochs: int | None
    """Epochs the run was given or chose (None for a max_steps run)."""
    stopped_early: bool
    """The run stopped before its last step: eval loss had stopped improving."""
    best_step: int
    """The step whose adapter was saved: the best evaluation's."""
    examples: int
    skipped_examples: int
    """Training examples longer than max_length, left out."""
    trainable_params: int
    total_params: int
    """Base plus adapter parameters."""
    train_loss: float
    """Mean training loss over the last epoch's worth of steps."""
    eval_loss_before: float
    """Mean cross-entropy per completion token of the base model (no adapter)."""
    eval_loss_after: float
    """The same with the trained adapter."""
    eval_source: str
    """The eval file, or a note that the training data was used."""
    tokens: int
    """Non-padding tokens this process trained on."""
    seconds: float
    """Wall time of this process's optimization steps."""
    tokens_per_s: float

    def summary(self) -> str:
        """A few human-readable lines."""
        share = 100.0 * self.trainable_params / self.total_params
        before, after, speed = self.eval_loss_before, self.eval_loss_after, self.tokens_per_s
        stopped = f", stopped early, kept step {self.best_step}" if self.stopped_early else ""
        return (
            f"{self.method}: {self.steps} steps on {self.examples} examples{stopped}, {speed:,.0f} tokens/s\n"
            f"train loss {self.train_loss:.4f}; eval loss ({self.eval_source}): {before:.4f} before, "
            f"{after:.4f} after\n"
            f"trainable parameters: {self.trainable_params:,} of {self.total_params:,} ({share:.3f}%)"
        )


@dataclass(frozen=True)
class RunData:
    """The tokenized data of a run and what is derived from it."""

    train_set: Dataset
    eval_set: Dataset | None
    eval_examples: Sequence[Example]
    """The eval file's examples, or the first TRAIN_EVAL_EXAMPLES training examples."""
    eval_source: str
    pad_id: int
    order: BatchOrder
    schedule: Schedule
    length: RunLength


def train(config: TrainConfig) -> TrainResult:
    """Train one adapter as `config` says; RNG state of the caller is left as it was."""
    loaded = load_base_model(config.base, config.device, config.dtype)
    data = prepare_data(config, loaded.tokenizer, loaded.max_context)
    fingerprint = _fingerprint(config, data)
    resumed = _resume_point(config, fingerprint, loaded.device)
    method = method_for(config.method)
    device, batch_size = loaded.device, config.batch_size
    lr_source = "--lr" if config.lr is not None else f"{config.method.name}'s default"
    log.info(
        "%s: %s; lr %g (%s), %s schedule", config.method.name, data.length.chosen, data.schedule.peak_lr,
        lr_source, config.lr_schedule,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        if resumed is None:
            eval_before = evaluate(loaded.model, data.eval_examples, batch_size, data.pad_id, device)
        else:
            eval_before = resumed.meta["eval_before"]
        context = BuildContext(
            data.schedule.total_steps,
            data.train_set.examples,
            data.pad_id,
            device,
            resumed.method if resumed else None,
        )
        model = method.build(loaded.model, context)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=data.schedule.peak_lr, weight_decay=config.weight_decay)
        state = _restore(model, optimizer, method, resumed) if resumed else LoopState()
        meta = {"eval_before": eval_before, **fingerprint}
        evaluation = Evaluation(
            lambda: evaluate(model, data.eval_examples, batch_size, data.pad_id, device),
            data.length.eval_every,
            data.length.early_stopping,
        )
        stats = run(
            model,
            method,
            optimizer,
            data.train_set.examples,
            data.order,
            data.schedule,
            state,
            pad_id=data.pad_id,
            device=device,
            max_grad_norm=config.max_grad_norm,
            progress=config.progress,
            evaluation=evaluation,
            on_step=_checkpointer(config, data.schedule.total_steps, model, optimizer, method, meta),
        )
        if state.best is not None and state.best_step != state.step:
            _load_params(model, state.best)  # the best evaluation's adapter, not the last step's
            log.info("kept the adapter of step %d (eval loss %.4f)", state.best_step, state.best_loss)
        eval_after = evaluate(model, data.eval_examples, batch_size, data.pad_id, device)
    output_dir = save_adapter(model, config.out_dir) if config.out_dir else None
    losses = state.recent_losses or [float("nan")]
    return TrainResult(
        method=config.method.name,
        output_dir=output_dir,
        steps=state.step,
        epochs=data.length.epochs,
        stopped_early=state.stopped_early,
        best_step=state.best_step if state.best is not None else state.step,
        examples=len(data.train_set),
        skipped_examples=data.train_set.skipped,
        trainable_params=sum(p.numel() for p in params),
        total_params=sum(p.numel() for p in model.parameters()),
        train_loss=sum(losses) / len(losses),
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        eval_source=data.eval_source,
        tokens=stats.tokens,
        seconds=stats.seconds,
        tokens_per_s=stats.tokens_per_s,
    )


def prepare_data(config: TrainConfig, tokenizer: PreTrainedTokenizerBase, max_context: int) -> RunData:
    """Load and check the training and eval files; fix the batch order and the run's length."""
    max_length = _max_length(config, max_context)
    train_set = load_dataset(config.data, tokenizer, max_length)
    if config.eval_data:
        eval_set = load_dataset(config.eval_data, tokenizer, max_length)
        eval_examples, eval_source = eval_set.examples, config.eval_data
    else:
        eval_set, eval_examples = None, train_set.examples[:TRAIN_EVAL_EXAMPLES]
        more = len(train_set) > TRAIN_EVAL_EXAMPLES
        eval_source = "training data" + (f", first {TRAIN_EVAL_EXAMPLES}" if more else "")
    order = BatchOrder(len(train_set), config.batch_size, config.seed)
    length = choose_length(
        len(train_set), config.batch_size, config.epochs, config.max_steps, config.eval_every,
        config.early_stopping,
    )  # fmt: skip
    schedule = Schedule(
        total_steps=length.total_steps,
        peak_lr=config.learning_rate,
        warmup_steps=config.warmup_steps,
        kind=config.lr_schedule,
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RunData(train_set, eval_set, eval_examples, eval_source, pad_id, order, schedule, length)


def save_adapter(model: PeftModel, out_dir: str | Path) -> Path:
    """save_pretrained (safetensors), with adapter_config.json's set-valued lists sorted for stable bytes."""
    directory = Path(out_dir)
    with warnings.catch_warnings():  # fully pruned AdaLoRA modules (0 ranks) make peft suspect DeepSpeed
        warnings.filterwarnings("ignore", message=".*LoRA tensor\\(s\\) have invalid shape")
        model.save_pretrained(directory)
    config_file = directory / "adapter_config.json"
    config = json.loads(config_file.read_text())
    if isinstance(config.get("target_modules"), list):  # peft keeps it as a set: its order is hash-seeded
        config["target_modules"] = sorted(config["target_modules"])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
    return directory


def _max_length(config: TrainConfig, max_context: int) -> int:
    """config.max_length, lowered to what the model's context holds (minus a prefix's virtual tokens)."""
    prefix = config.method.num_virtual_tokens if isinstance(config.method, PrefixOptions) else 0
    room = max_context - prefix
    if room < 2:
        raise InvalidRequest(f"{prefix} virtual tokens leave no room in the model's context of {max_context}")
    if config.max_length > room:
        log.info("max_length %d lowered to %d to fit the model's context", config.max_length, room)
    return min(config.max_length, room)


def _fingerprint(config: TrainConfig, data: RunData) -> dict[str, Any]:
    """Everything that shapes the trajectory; a checkpoint resumes only a run with the same fingerprint."""
    fields = ("base", "epochs", "max_steps", "lr", "lr_schedule", "warmup_steps", "weight_decay")
    fields += ("max_grad_norm", "batch_size", "max_length", "seed", "dtype", "eval_every", "early_stopping")
    return {
        "run": {name: getattr(config, name) for name in fields},
        "method": {"name": config.method.name, **dataclasses.asdict(config.method)},
        "data": data.train_set.digest,
        "eval": data.eval_set.digest if data.eval_set else None,
    }


def _resume_point(
    config: TrainConfig, fingerprint: dict[str, Any], device: torch.device
) -> ckpt.Checkpoint | None:
    if not config.resume:
        return None
    found = ckpt.checkpoint_dirs(config.checkpoint_dir)
    if not found:
        log.info("no checkpoint in %s: starting from step 0", config.checkpoint_dir)
        return None
    checkpoint = ckpt.load_checkpoint(found[-1], device)
    saved = {key: checkpoint.meta.get(key) for key in fingerprint}
    differs = [key for key in fingerprint if _canonical(saved[key]) != _canonical(fingerprint[key])]
    if differs:
        raise InvalidRequest(
            f"checkpoint {found[-1]} was made by a different run ({', '.join(differs)} differ); "
            "resume with the same settings and data, or use another --checkpoint-dir"
        )
    return checkpoint


def _restore(
    model: PeftModel, optimizer: torch.optim.Optimizer, method: TrainingMethod, checkpoint: ckpt.Checkpoint
) -> LoopState:
    """Parameters, optimizer, RNG and method state as checkpointed; the loop's state to continue from."""
    ckpt.restore(model, optimizer, checkpoint)
    method.load_state(model, checkpoint.method)
    log.info("resumed from step %d", checkpoint.step)
    meta = checkpoint.meta
    return LoopState(
        step=checkpoint.step,
        tokens=meta["tokens"],
        recent_losses=deque(meta["recent_losses"]),
        eval_loss=meta.get("eval_loss"),
        best_loss=meta.get("best_loss"),
        best_step=meta.get("best_step", 0),
        evals_without_improvement=meta.get("evals_without_improvement", 0),
        best=checkpoint.best or None,
    )


def _load_params(model: PeftModel, params: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in params:
                param.copy_(params[name])


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _checkpointer(
    config: TrainConfig,
    total_steps: int,
    model: PeftModel,
    optimizer: torch.optim.Optimizer,
    method: TrainingMethod,
    meta: dict[str, Any],
) -> Callable[[LoopState], None] | None:
    """The loop's on_step: a checkpoint every checkpoint_every steps and after the last one."""
    if not config.checkpoint_dir:
        return None

    def on_step(state: LoopState) -> None:
        if state.step % config.checkpoint_every and state.step != total_steps:
            return
        snapshot = ckpt.capture(
            state.step, model, optimizer, method.state(model), {**meta, **state.meta()}, state.best
        )
        ckpt.save_checkpoint(config.checkpoint_dir, snapshot, config.keep_checkpoints)

    return on_step
