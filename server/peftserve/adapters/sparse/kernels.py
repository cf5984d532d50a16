"""Sparse delta kernels: a dense-materializing torch reference and a gather/index_add fast path."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..batch import AdapterBatch
from ..normalized import SparseDelta


def sparse_reference(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[SparseDelta | None]
) -> None:
    """Reference: materialize dW of each slot densely, one sequence at a time.

    Semantics: dW[s] = zeros(out, in); dW[s][rows[i], cols[i]] += values[i]; then for every span
    (start, len, pairs) and token t in it: y[t] += sum_{(s, w) in pairs} w * x[t] @ dW[s].T
    """
    out_features, in_features = y.shape[1], x.shape[1]
    dense: dict[int, torch.Tensor] = {}
    for start, length, pairs in batch.spans:
        xs = x[start : start + length]  # [n, in]
        for slot, weight in pairs:
            d = slots[slot]
            if d is None:
                continue
            if slot not in dense:
                dw = torch.zeros(out_features, in_features, dtype=y.dtype, device=y.device)
                dense[slot] = dw.index_put_((d.rows, d.cols), d.values, accumulate=True)  # [out, in]
            y[start : start + length] += weight * (xs @ dense[slot].T)


def sparse_grouped(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[SparseDelta | None]
) -> None:
    """Fast path per distinct slot: gather the k input columns, scale, index_add into the k output columns.

    Semantics: same as sparse_reference; y[t, rows[i]] += w * x[t, cols[i]] * values[i] for every entry i.
    Costs O(n * k) for a group of n tokens and k entries, never a dense [out, in] matrix.
    """
    for g in batch.groups:
        d = slots[g.slot]
        if d is None:
            continue
        xs = x[g.start : g.stop] if g.index is None else x.index_select(0, g.index)  # [n, in]
        contrib = xs.index_select(1, d.cols) * d.values  # [n, k]
        if g.weight is not None:
            contrib.mul_(g.weight)
        elif g.scale != 1.0:
            contrib.mul_(g.scale)
        if g.index is None:
            y[g.start : g.stop].index_add_(1, d.rows, contrib)
        else:
            y.index_add_(0, g.index, torch.zeros_like(y[: g.num_tokens]).index_add_(1, d.rows, contrib))
