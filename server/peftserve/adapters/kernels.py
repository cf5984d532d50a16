"""The one place that picks the delta kernels for a device (DESIGN.md, Decision 9)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .batch import AdapterBatch
from .lora import lora_grouped, lora_reference
from .normalized import LoraDelta, SparseDelta
from .sparse import sparse_grouped, sparse_reference

LoraKernel = Callable[[torch.Tensor, torch.Tensor, AdapterBatch, Sequence[LoraDelta | None]], None]
SparseKernel = Callable[[torch.Tensor, torch.Tensor, AdapterBatch, Sequence[SparseDelta | None]], None]


@dataclass(frozen=True)
class DeltaKernels:
    """The kernels a MultiAdapterLayer calls: each adds its deltas into y [T, out] in place."""

    name: str
    lora: LoraKernel
    sparse: SparseKernel


REFERENCE = DeltaKernels("reference", lora_reference, sparse_reference)
GROUPED = DeltaKernels("grouped", lora_grouped, sparse_grouped)

BY_DEVICE_TYPE: dict[str, DeltaKernels] = {
    "cpu": GROUPED,
    "cuda": GROUPED,
}
"""Device type -> kernels; a device without an entry runs the reference."""


def select_kernels(device: torch.device | str) -> DeltaKernels:
    return BY_DEVICE_TYPE.get(torch.device(device).type, REFERENCE)
