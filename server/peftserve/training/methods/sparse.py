"""Gradient-selected sparse tuning, trained and saved as peft's SHiRA (shira_indices + shira_weight)."""

from __future__ import annotations

import torch
from peft import PeftModel, ShiraConfig
from torch import nn
from transformers import PreTrainedModel

from peftserve.training.config import SparseOptions
from peftserve.training.gradient_selection import rank_equivalent, resolve_targets, select_masks

from .base import BuildContext, MethodState, TrainingMethod, wrap

ADAPTER = "default"


class SparseMethod(TrainingMethod[SparseOptions]):
    """Score entries on the training data, then let SHiRA train exactly those (its mask_fn returns our mask).

    SHiRA's delta starts at zero (init_weights=True), so training starts at the base model; a checkpoint
    carries the indices, so a resumed run trains the same entries without recalibrating.
    """

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        targets = resolve_targets(base, options.target_modules)
        r = rank_equivalent(options.budget, {p: tuple(m.weight.shape) for p, m in targets.items()})
        if context.restored is not None:
            masks = masks_from_indices(context.restored, targets)
        else:
            examples = context.examples[: options.calibration_examples]
            masks = select_masks(base, targets, examples, options.rule, r, context.pad_id, context.device)
        by_module = {targets[path]: mask for path, mask in masks.items()}

        def mask_fn(base_layer: nn.Module, r: int, **_: object) -> torch.Tensor:
            return by_module[base_layer].to(base_layer.weight.dtype)  # [out, in], exactly r·(out+in) ones

        config = ShiraConfig(r=r, target_modules=sorted(targets), init_weights=True)
        config.mask_fn = mask_fn
        return wrap(base, config, "sparse")

    def state(self, model: PeftModel) -> MethodState:
        return MethodState(shira_indices(model))


def shira_indices(model: PeftModel) -> dict[str, torch.Tensor]:
    """Base module path -> its SHiRA indices [2, k] (rows, cols)."""
    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): module.shira_indices[ADAPTER]
        for name, module in model.named_modules()
        if hasattr(module, "shira_indices") and ADAPTER in module.shira_indices
    }


def masks_from_indices(state: MethodState, targets: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """The bool masks [out, in] a checkpoint's indices describe."""
    masks = {}
    for path, module in targets.items():
        mask = torch.zeros_like(module.weight, dtype=torch.bool)
        rows, cols = state.tensors[path].to(device=mask.device, dtype=torch.long)
        mask[rows, cols] = True
        masks[path] = mask
    return masks
