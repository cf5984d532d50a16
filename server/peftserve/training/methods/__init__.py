"""Training methods, one module each; adding a method is adding a module and a line in METHODS."""

from __future__ import annotations

from peftserve.training.config import AdaLoraOptions, LoraOptions, MethodOptions, PrefixOptions, SparseOptions

from .adalora import AdaLoraMethod
from .base import BuildContext, MethodState, TrainingMethod
from .lora import LoraMethod
from .prefix import PrefixMethod
from .sparse import SparseMethod

METHODS: dict[type, type[TrainingMethod]] = {
    LoraOptions: LoraMethod,
    AdaLoraOptions: AdaLoraMethod,
    PrefixOptions: PrefixMethod,
    SparseOptions: SparseMethod,
}


def method_for(options: MethodOptions) -> TrainingMethod:
    """The method that trains adapters described by `options`."""
    return METHODS[type(options)](options)


__all__ = ["BuildContext", "MethodState", "TrainingMethod", "method_for"]
