"""DoRA through peft: LoRA with use_dora (a magnitude per output feature, trained with the update)."""

from __future__ import annotations

from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel

from peftserve.training.config import DoraOptions

from .base import BuildContext, TrainingMethod, number, target_modules, wrap


class DoraMethod(TrainingMethod[DoraOptions]):
    """peft's DoRA; B = 0 at the start, so training starts at the base model."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=options.rank,
            lora_alpha=number(options.alpha),
            lora_dropout=options.dropout,
            target_modules=target_modules(options.target_modules),
            use_dora=True,
        )
        return wrap(base, config, "dora")
