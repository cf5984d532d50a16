"""The contract every training method follows: build the PEFT model, step hooks, checkpoint state."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from peftserve.errors import InvalidRequest
from peftserve.training.data import Example

OptionsT = TypeVar("OptionsT")


@dataclass(frozen=True)
class MethodState:
    """Method-specific training state a checkpoint must carry beyond parameters and optimizer."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    """JSON-serializable."""


@dataclass(frozen=True)
class BuildContext:
    """What building an adapter may need beyond its options."""

    total_steps: int
    """Optimizer steps of the whole run (AdaLoRA's budget schedule)."""
    examples: Sequence[Example]
    """Training examples in file order (sparse calibration)."""
    pad_id: int
    device: torch.device
    restored: MethodState | None = None
    """State of the checkpoint being resumed, needed before the model is built (sparse masks)."""


class TrainingMethod(Generic[OptionsT]):
    """How one adapter kind is put on the frozen base, stepped and checkpointed."""

    def __init__(self, options: OptionsT):
        self.options = options

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        """Wrap `base` (in place) into a PeftModel whose adapter parameters are the only trainable ones."""
        raise NotImplementedError

    def after_optimizer_step(self, model: PeftModel, step: int) -> None:
        """Called after optimizer step `step` (0-based), while the gradients are still there."""

    def state(self, model: PeftModel) -> MethodState:
        """Extra state for a checkpoint."""
        return MethodState()

    def load_state(self, model: PeftModel, state: MethodState) -> None:
        """Restore what state() returned, after the parameters are restored."""


def wrap(base: PreTrainedModel, config: PeftConfig, method: str) -> PeftModel:
    """get_peft_model, with peft's complaints about the targets turned into InvalidRequest."""
    try:
        return get_peft_model(base, config)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"cannot put a {method} adapter on this model: {exc}") from exc


def target_modules(names: tuple[str, ...]) -> str | list[str]:
    """peft's target_modules argument: 'all-linear' stays a string, names become a list."""
    return names[0] if names == ("all-linear",) else list(names)


def number(value: float) -> int | float:
    """An integral float as int, so adapter_config.json says 16 rather than 16.0."""
    return int(value) if float(value).is_integer() else value
