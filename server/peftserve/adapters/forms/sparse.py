"""Additive sparse: y[t, rows[i]] += x[t, cols[i]] * values[i] (SHiRA, gradient-selected sparse deltas)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..batch import AdapterBatch
from .base import Delta, Form, Stage, entries_limit, entries_rank, triton_kernel


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


GATHER_BUDGET = 1 << 22
"""Most elements of the [n, k] gathered-columns temporary; larger token groups go in chunks."""


def _add_sparse(y: torch.Tensor, x: torch.Tensor, d: SparseDelta, scale: float) -> None:
    """y [n, out] += scale * x [n, in] @ dW.T, through the k entries, in token chunks of bounded memory."""
    chunk = max(1, GATHER_BUDGET // max(1, d.nnz))
    for start in range(0, x.shape[0], chunk):
        contrib = x[start : start + chunk].index_select(1, d.cols) * d.values  # [c, k]
        if scale != 1.0:
            contrib.mul_(scale)
        y[start : start + chunk].index_add_(1, d.rows, contrib)


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
        if g.index is None:
            _add_sparse(y[g.start : g.stop], x[g.start : g.stop], d, g.scale)
            continue
        xs = x.index_select(0, g.index)  # [n, in]
        if g.weight is not None:
            xs.mul_(g.weight)
        ys = torch.zeros(g.num_tokens, y.shape[1], dtype=y.dtype, device=y.device)  # [n, out]
        _add_sparse(ys, xs, d, g.scale)
        y.index_add_(0, g.index, ys)


class SparseForm(Form):
    stage = Stage.ADD
    name = "sparse"
    kernels = {
        "reference": sparse_reference,
        "grouped": sparse_grouped,
        "triton": triton_kernel("sparse_triton"),
    }

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.slots)


@dataclass(frozen=True)
class SparseDelta(Delta):
    """A sparse update dW[rows[i], cols[i]] += values[i] of one module (duplicates accumulate)."""

    form: ClassVar[type[Form]] = SparseForm

    rows: torch.Tensor
    """[k] int64, output feature of each entry"""
    cols: torch.Tensor
    """[k] int64, input feature of each entry"""
    values: torch.Tensor
    """[k]"""

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    def misfit(self, shape: tuple[int, int]) -> str | None:
        out_features, in_features = shape
        rows_ok = bool(((self.rows >= 0) & (self.rows < out_features)).all())
        cols_ok = bool(((self.cols >= 0) & (self.cols < in_features)).all())
        if not (rows_ok and cols_ok):
            return f"shira_indices fall outside the base module's {shape}"
        return None

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return entries_rank(self.nnz, shape)

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        limit = entries_limit(shape, max_rank)
        if self.nnz > limit:
            return f"{self.nnz} sparse entries exceed max_rank * (out + in) = {limit}"
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [("values", self.values)]
