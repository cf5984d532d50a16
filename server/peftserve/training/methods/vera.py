"""VeRA through peft: trained vectors around frozen random projections, saved with the adapter."""

from __future__ import annotations

from peft import PeftModel, VeraConfig
from transformers import PreTrainedModel

from peftserve.training.config import VeraOptions

from .base import BuildContext, TrainingMethod, target_modules, wrap


class VeraMethod(TrainingMethod[VeraOptions]):
    """peft's VeRA; lambda_b starts at 0, so training starts at the base model. The projections are
    saved with the adapter (save_projection), which is what the server serves."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        config = VeraConfig(
            task_type="CAUSAL_LM",
            r=options.rank,
            d_initial=options.d_initial,
            vera_dropout=options.dropout,
            projection_prng_key=options.projection_prng_key,
            save_projection=True,
            target_modules=target_modules(options.target_modules),
        )
        return wrap(base, config, "vera")
