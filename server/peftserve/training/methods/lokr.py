"""LoKr through peft: the Kronecker product of two factors per target module."""

from __future__ import annotations

from peft import LoKrConfig, PeftModel
from transformers import PreTrainedModel

from peftserve.training.config import LokrOptions

from .base import BuildContext, TrainingMethod, number, target_modules, wrap


class LokrMethod(TrainingMethod[LokrOptions]):
    """peft's LoKr; the first factor starts at 0, so training starts at the base model."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = LoKrConfig(
            task_type="CAUSAL_LM",
            r=options.rank,
            alpha=number(options.alpha),
            decompose_both=options.decompose_both,
            decompose_factor=options.decompose_factor,
            target_modules=target_modules(options.target_modules),
        )
        return wrap(base, config, "lokr")
