"""Adapters: PEFT directories normalized at load, a multi-adapter layer over the frozen base, memory tiers.

Each kind is a folder (its loader) and a line in kinds.py naming the compute forms (forms/) its deltas
use; every MultiAdapterLayer loops over those forms. The engine-facing API is AdapterManager (registry,
host cache, device slots); AdapterAdminService implements the admin protocol over it and the store;
AdapterBatch is what the runner builds each step.
"""

from .admin import AdapterAdminService
from .batch import AdapterBatch, AdapterContext, SlotGroup, Span
from .forms import Delta, Form, LowRankDelta, SparseDelta
from .kernels import select_kernels
from .kinds import KINDS, Kind
from .layer import MultiAdapterLayer
from .loading import load_adapter
from .manager import AdapterManager, ResolvedAdapters, canonical_id
from .normalized import NormalizedAdapter, PrefixKV

__all__ = [
    "AdapterAdminService",
    "AdapterBatch",
    "AdapterContext",
    "AdapterManager",
    "Delta",
    "Form",
    "KINDS",
    "Kind",
    "LowRankDelta",
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
