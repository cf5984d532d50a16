"""Host -> device copies of adapter deltas: on CUDA from pinned memory on a side stream, overlapping compute.

A cold adapter's deltas are copied layer by layer on a stream of their own; each MultiAdapterLayer
receives the event that fences its copies and makes the compute stream wait for it only where it first
reads them in a forward. So layer 0 computes while the copies of later layers are still in flight. On
the CPU a copy is a plain synchronous `to`.
"""

from __future__ import annotations

import torch

from .forms import Delta


class DeltaCopier:
    """Moves deltas to the device in the served dtype; `copy` returns the moved delta and its fence."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def pins_host_memory(self) -> bool:
        """Whether host copies should be page-locked (asynchronous copies need it)."""
        return self.stream is not None

    def copy(self, delta: Delta) -> tuple[Delta, torch.cuda.Event | None]:
        if self.stream is None:
            return delta.to(self.device, self.dtype), None
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            moved = delta.to(self.device, self.dtype, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        for part in moved.parts():
            for tensor in part.tensors().values():
                tensor.record_stream(compute)  # freed on the compute stream: not reused before it is done
        return moved, ready

    def fence(self, ready: torch.cuda.Event | None) -> None:
        """Make the compute stream wait for a copy now (for targets that do not wait themselves)."""
        if ready is not None:
            torch.cuda.current_stream(self.device).wait_event(ready)
