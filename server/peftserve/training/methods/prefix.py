"""Prefix tuning through peft: trained key/value vectors prepended in every layer."""

from __future__ import annotations

from peft import PeftModel, PrefixTuningConfig
from transformers import PreTrainedModel

from peftserve.training.config import PrefixOptions

from .base import BuildContext, TrainingMethod, wrap


class PrefixMethod(TrainingMethod[PrefixOptions]):
    """peft's prefix tuning; with projection, the saved prefix is the MLP's output (applied at save)."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = PrefixTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=options.num_virtual_tokens,
            prefix_projection=options.projection,
            encoder_hidden_size=options.encoder_hidden_size or base.config.get_text_config().hidden_size,
        )
        return wrap(base, config, "prefix")
