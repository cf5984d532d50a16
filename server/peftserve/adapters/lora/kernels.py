"""Low-rank delta kernels: a per-sequence torch reference and the slot-grouped fast path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batch import AdapterBatch
from ..normalized import LoraDelta


def lora_reference(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LoraDelta | None]
) -> None:
    """Reference, one sequence at a time, straight from the batch's spans.

    Semantics: for every span (start, len, pairs) and token t in it,
        y[t] += sum_{(s, w) in pairs, slots[s] is not None} w * (x[t] @ A[s].T) @ B[s].T
    y: [T, out] base output, updated in place; x: [T, in]. Tokens outside every span are not touched.
    """
    for start, length, pairs in batch.spans:
        xs = x[start : start + length]  # [n, in]
        delta = None
        for slot, weight in pairs:
            d = slots[slot]
            if d is None:
                continue
            term = weight * ((xs @ d.a.T) @ d.b.T)  # [n, out]
            delta = term if delta is None else delta + term
        if delta is not None:
            y[start : start + length] += delta


def lora_grouped(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LoraDelta | None]
) -> None:
    """Fast path: one (x @ A.T) @ B.T per distinct slot of the step, over that slot's token group.

    Semantics: same as lora_reference. Contiguous groups read and update slices of x and y in place
    (no copies), single decode tokens use matrix-vector products (measured faster on CPU); scattered
    groups gather rows with index_select and scatter with index_add_. Mixture weights ride on alpha,
    or on the [n, r] intermediate when they vary within a group.
    """
    for g in batch.groups:
        d = slots[g.slot]
        if d is None:
            continue
        if g.index is None and g.num_tokens == 1:  # a decode token: matrix-vector products
            t = g.start
            y[t].addmv_(d.b, torch.mv(d.a, x[t]), alpha=g.scale)  # [out] += B @ (A @ x[t])
        elif g.index is None:
            h = x[g.start : g.stop] @ d.a.T  # [n, r]
            y[g.start : g.stop].addmm_(h, d.b.T, alpha=g.scale)
        else:
            h = x.index_select(0, g.index) @ d.a.T  # [n, r]
            if g.weight is not None:
                h.mul_(g.weight)
            y.index_add_(0, g.index, h @ d.b.T, alpha=g.scale)
