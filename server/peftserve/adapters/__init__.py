"""Adapters: PEFT directories normalized at load, a multi-adapter layer over the frozen base, memory tiers.

The engine-facing API is AdapterManager (registry, host cache, device slots); AdapterAdminService
implements the admin protocol over it and the store; AdapterBatch is what the runner builds each step.
"""

from .admin import AdapterAdminService
from .batch import AdapterBatch, AdapterContext, SlotGroup, Span
from .kernels import DeltaKernels, select_kernels
from .layer import MultiAdapterLayer
from .loading import load_adapter
from .manager import AdapterManager, ResolvedAdapters, canonical_id
from .normalized import LoraDelta, NormalizedAdapter, PrefixKV, SparseDelta

__all__ = [
    "AdapterAdminService",
    "AdapterBatch",
    "AdapterContext",
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
    "canonical_id",
    "load_adapter",
    "select_kernels",
]
