"""LoHa through peft: the Hadamard product of two low-rank products per target module."""

from __future__ import annotations

from peft import LoHaConfig, PeftModel
from transformers import PreTrainedModel

from peftserve.training.config import LohaOptions

from .base import BuildContext, TrainingMethod, number, target_modules, wrap


class LohaMethod(TrainingMethod[LohaOptions]):
    """peft's LoHa; one factor of the second product starts at 0, so training starts at the base model."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = LoHaConfig(
            task_type="CAUSAL_LM",
            r=options.rank,
            alpha=number(options.alpha),
            module_dropout=options.module_dropout,
            target_modules=target_modules(options.target_modules),
        )
        return wrap(base, config, "loha")
