"""The one place that picks the forms' kernels for a device (DESIGN.md, Decision 9).

Every form has a 'reference' kernel (pure torch, one sequence at a time, the definition) and a
'grouped' one (one product per distinct slot of the step), tested against it in tests/adapters.
"""

from __future__ import annotations

import torch

KERNELS = ("reference", "grouped")

BY_DEVICE_TYPE: dict[str, str] = {
    "cpu": "grouped",
    "cuda": "grouped",
}
"""Device type -> kernels; a device without an entry runs the reference."""


def select_kernels(device: torch.device | str) -> str:
    return BY_DEVICE_TYPE.get(torch.device(device).type, "reference")
