"""LoRA through peft: a rank-r update on each target module."""

from __future__ import annotations

from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel

from peftserve.training.config import LoraOptions

from .base import BuildContext, TrainingMethod, number, target_modules, wrap


class LoraMethod(TrainingMethod[LoraOptions]):
    """peft's LoRA, default initialization (B = 0, so training starts at the base model)."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=options.rank,
            lora_alpha=number(options.alpha),
            lora_dropout=options.dropout,
            target_modules=target_modules(options.target_modules),
        )
        return wrap(base, config, "lora")
