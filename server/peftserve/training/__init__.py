"""The bundled trainer: every kind the server serves (LoRA, DoRA, AdaLoRA, IA³, LoHa, LoKr, VeRA, prefix
tuning, gradient-selected sparse), trained with peft from JSONL data.

`train(TrainConfig(...)) -> TrainResult`; the options classes name the method. Importing this package
does not import torch (the CLI builds its parser from it); `train` and `TrainResult` load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from peftserve.training.config import (
    AdaLoraOptions,
    DoraOptions,
    Ia3Options,
    LohaOptions,
    LokrOptions,
    LoraOptions,
    MethodOptions,
    PrefixOptions,
    SparseOptions,
    TrainConfig,
    VeraOptions,
)

if TYPE_CHECKING:
    from peftserve.training.trainer import TrainResult, train

__all__ = [
    "AdaLoraOptions",
    "DoraOptions",
    "Ia3Options",
    "LohaOptions",
    "LokrOptions",
    "LoraOptions",
    "MethodOptions",
    "PrefixOptions",
    "SparseOptions",
    "TrainConfig",
    "TrainResult",
    "VeraOptions",
    "train",
]


def __getattr__(name: str) -> Any:
    if name in ("train", "TrainResult"):
        from peftserve.training import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
