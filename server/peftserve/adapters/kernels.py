"""The one place that picks the forms' kernels for a device (DESIGN.md, Decision 9).

Every form has a 'reference' kernel (pure torch, one sequence at a time, the definition), a 'grouped'
one (one product per distinct slot of the step) and a 'triton' one (a fixed number of launches per step
whatever the number of adapters: adapters/triton/), each tested against the reference in tests/adapters.
A form may also have a 'parallel' one (the grouped products shared out among the CPU's threads,
workers.py) and a 'compiled' one (decode rows in one torch.compile'd pass per layer:
forms/low_rank_rows.py); a form without them runs its parallel, else its grouped kernel.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

KERNELS = ("reference", "grouped", "parallel", "compiled", "triton")

FALLBACK: dict[str, str] = {"compiled": "parallel", "parallel": "grouped"}
"""Kernels -> what a form without them runs."""

BY_DEVICE_TYPE: dict[str, str] = {
    "cpu": "compiled",
    "cuda": "triton",
}
"""Device type -> kernels; a device without an entry runs the reference. On CPU no Triton: it runs there
only in its interpreter, which is for proving exactness, not for speed."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def select_kernels(device: torch.device | str) -> str:
    kernels = BY_DEVICE_TYPE.get(torch.device(device).type, "reference")
    if kernels == "triton" and not triton_available():
        log.warning("triton is not installed: adapter deltas on %s run the grouped torch kernels", device)
        return "grouped"
    return kernels
