"""LoRA through peft: a rank-r update on each target module (DoRA: the same with use_dora)."""

from __future__ import annotations

from typing import ClassVar

from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel

from peftserve.training.config import LoraOptions

from .base import BuildContext, TrainingMethod, number, target_modules, wrap


class LoraMethod(TrainingMethod[LoraOptions]):
    """peft's LoRA, default initialization (B = 0, so training starts at the base model)."""

    use_dora: ClassVar[bool] = False

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = LoraConfig(
            task_type="CAUSAL_LM",
            r=options.rank,
            lora_alpha=number(options.alpha),
            lora_dropout=options.dropout,
            target_modules=target_modules(options.target_modules),
            use_dora=self.use_dora,
        )
        return wrap(base, config, "dora" if self.use_dora else "lora")


class DoraMethod(LoraMethod):
    """peft's DoRA (DoraOptions: the same fields): LoRA plus a magnitude per output feature, trained too."""

    use_dora = True
