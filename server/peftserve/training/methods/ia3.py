"""IA³ through peft: learned scaling vectors, on the input of feedforward modules, the output elsewhere."""

from __future__ import annotations

from peft import IA3Config, PeftModel
from transformers import PreTrainedModel

from peftserve.training.config import Ia3Options

from .base import BuildContext, TrainingMethod, wrap


class Ia3Method(TrainingMethod[Ia3Options]):
    """peft's IA³; the vectors start at 1, so training starts at the base model."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = IA3Config(
            task_type="CAUSAL_LM",
            target_modules=list(options.target_modules) if options.target_modules else None,
            feedforward_modules=list(options.feedforward_modules) if options.feedforward_modules else None,
        )
        return wrap(base, config, "ia3")
