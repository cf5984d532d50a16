"""Adapters: PEFT directories normalized at load, a multi-adapter layer over the frozen base, device slots.

The runner-facing API is AdapterManager; AdapterBatch is what the runner builds each step.
"""

from .batch import AdapterBatch, AdapterContext, SlotGroup, Span
from .kernels import DeltaKernels, select_kernels
from .layer import MultiAdapterLayer
from .loading import load_adapter
from .manager import AdapterInfo, AdapterManager, ResolvedAdapters, validate_adapter_id
from .normalized import LoraDelta, NormalizedAdapter, PrefixKV, SparseDelta

__all__ = [
    "AdapterBatch",
    "AdapterContext",
    "AdapterInfo",
    "AdapterManager",
    "DeltaKernels",
    "LoraDelta",
    "MultiAdapterLayer",
    "NormalizedAdapter",
    "PrefixKV",
    "ResolvedAdapters",
    "SlotGroup",
    "SparseDelta",
    "Span",
    "load_adapter",
    "select_kernels",
    "validate_adapter_id",
]
