"""Training methods, one module each; adding a method is adding a module and a line in METHODS."""

from __future__ import annotations

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
    VeraOptions,
)

from .adalora import AdaLoraMethod
from .base import BuildContext, MethodState, TrainingMethod
from .ia3 import Ia3Method
from .loha import LohaMethod
from .lokr import LokrMethod
from .lora import DoraMethod, LoraMethod
from .prefix import PrefixMethod
from .sparse import SparseMethod
from .vera import VeraMethod

METHODS: dict[type, type[TrainingMethod]] = {
    LoraOptions: LoraMethod,
    DoraOptions: DoraMethod,
    AdaLoraOptions: AdaLoraMethod,
    Ia3Options: Ia3Method,
    LohaOptions: LohaMethod,
    LokrOptions: LokrMethod,
    VeraOptions: VeraMethod,
    PrefixOptions: PrefixMethod,
    SparseOptions: SparseMethod,
}


def method_for(options: MethodOptions) -> TrainingMethod:
    """The method that trains adapters described by `options`."""
    return METHODS[type(options)](options)


__all__ = ["BuildContext", "MethodState", "TrainingMethod", "method_for"]
