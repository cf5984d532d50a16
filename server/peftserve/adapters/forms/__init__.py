"""The compute forms every adapter kind is normalized into (DESIGN.md, Decision 3), one module each."""

from .base import (
    BaseModule,
    Delta,
    Form,
    JointDelta,
    LayerSpec,
    SharedTensors,
    SlotList,
    Stage,
    entries_limit,
    shared_nbytes,
    triton_kernel,
)
from .dense import DenseDelta, DenseForm, KroneckerDelta, KroneckerForm, kron_cost
from .low_rank import LowRankDelta, LowRankForm
from .projected import ProjectedDelta, ProjectedForm
from .scaling import InputScaleDelta, InputScaleForm, OutputScaleDelta, OutputScaleForm
from .sparse import SparseDelta, SparseForm

__all__ = [
    "BaseModule",
    "Delta",
    "DenseDelta",
    "DenseForm",
    "Form",
    "InputScaleDelta",
    "InputScaleForm",
    "JointDelta",
    "KroneckerDelta",
    "KroneckerForm",
    "LayerSpec",
    "LowRankDelta",
    "LowRankForm",
    "OutputScaleDelta",
    "OutputScaleForm",
    "ProjectedDelta",
    "ProjectedForm",
    "SharedTensors",
    "SlotList",
    "SparseDelta",
    "SparseForm",
    "Stage",
    "entries_limit",
    "kron_cost",
    "shared_nbytes",
    "triton_kernel",
]
