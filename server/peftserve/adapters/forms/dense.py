"""Additive dense and Kronecker-structured deltas (LoHa and LoKr where their factors do not pay).

A Kronecker delta dW = kron(W1, W2) is computed from its factors: with x viewed as X [c, d],
kron(W1, W2) @ x = vec(W1 @ X @ W2.T), a few small matrix products instead of an [out, in] one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..batch import AdapterBatch
from .base import Delta, Form, Stage, entries_limit, entries_rank, triton_kernel


def dense_reference(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[DenseDelta | None]
) -> None:
    """Reference, one sequence at a time.

    Semantics: for every span (start, len, pairs) and token t in it,
        y[t] += sum_{(s, w) in pairs} w * x[t] @ W[s].T
    """
    for start, length, pairs in batch.spans:
        for slot, weight in pairs:
            d = slots[slot]
            if d is not None:
                y[start : start + length] += weight * (x[start : start + length] @ d.weight.T)


def dense_grouped(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[DenseDelta | None]
) -> None:
    """Fast path: one matrix product per distinct slot over its token group. Semantics: as the reference."""
    for g in batch.groups:
        d = slots[g.slot]
        if d is None:
            continue
        if g.index is None:
            y[g.start : g.stop].addmm_(x[g.start : g.stop], d.weight.T, alpha=g.scale)
            continue
        xs = x.index_select(0, g.index)  # [n, in]
        if g.weight is not None:
            xs.mul_(g.weight)
        y.index_add_(0, g.index, xs @ d.weight.T, alpha=g.scale)


class DenseForm(Form):
    stage = Stage.ADD
    name = "dense"
    kernels = {
        "reference": dense_reference,
        "grouped": dense_grouped,
        "triton": triton_kernel("dense_triton"),
    }

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.slots)


@dataclass(frozen=True)
class DenseDelta(Delta):
    """dW held whole, every scaling folded in."""

    form: ClassVar[type[Form]] = DenseForm

    weight: torch.Tensor
    """[out, in]"""
    origin: str
    """Which kind it came from and why dense (e.g. 'LoHa r=32: denser than its factors'), for messages."""

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if tuple(self.weight.shape) != shape:
            return f"a delta of shape {tuple(self.weight.shape)}, the base module is {shape}"
        return None

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return entries_rank(self.weight.numel(), shape)

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        limit = entries_limit(shape, max_rank)
        if self.weight.numel() > limit:
            return (
                f"{self.origin} is served as a dense delta of {self.weight.numel()} entries, over "
                f"max_rank * (out + in) = {limit}"
            )
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [("delta weight", self.weight)]


def kron_apply(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """x [n, c*d] @ kron(w1 [a, c], w2 [b, d]).T -> [n, a*b], in whichever product order is cheaper."""
    a, c = w1.shape
    b, d = w2.shape
    xs = x.reshape(-1, c, d)  # [n, c, d]
    if c * b * (d + a) <= a * d * (c + b):
        h = xs @ w2.T  # [n, c, b]
        out = torch.matmul(w1, h)  # [n, a, b]
    else:
        h = torch.matmul(w1, xs)  # [n, a, d]
        out = h @ w2.T  # [n, a, b]
    return out.reshape(-1, a * b)


def kron_reference(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[KroneckerDelta | None]
) -> None:
    """Reference: materialize kron(W1, W2) densely, one sequence at a time.

    Semantics: for every span (start, len, pairs) and token t in it,
        y[t] += sum_{(s, w) in pairs} w * x[t] @ kron(W1[s], W2[s]).T
    """
    for start, length, pairs in batch.spans:
        for slot, weight in pairs:
            d = slots[slot]
            if d is not None:
                dense = torch.kron(d.w1, d.w2)  # [out, in]
                y[start : start + length] += weight * (x[start : start + length] @ dense.T)


def kron_grouped(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[KroneckerDelta | None]
) -> None:
    """Fast path per slot group, from the factors (never the dense product). Semantics: as the reference."""
    for g in batch.groups:
        d = slots[g.slot]
        if d is None:
            continue
        if g.index is None:
            y[g.start : g.stop].add_(kron_apply(x[g.start : g.stop], d.w1, d.w2), alpha=g.scale)
            continue
        xs = x.index_select(0, g.index)  # [n, in]
        if g.weight is not None:
            xs.mul_(g.weight)
        y.index_add_(0, g.index, kron_apply(xs, d.w1, d.w2), alpha=g.scale)


class KroneckerForm(Form):
    stage = Stage.ADD
    name = "kronecker"
    kernels = {"reference": kron_reference, "grouped": kron_grouped, "triton": triton_kernel("kron_triton")}

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.slots)


@dataclass(frozen=True)
class KroneckerDelta(Delta):
    """dW = kron(w1, w2), every scaling folded into w1."""

    form: ClassVar[type[Form]] = KroneckerForm

    w1: torch.Tensor
    """[a, c]"""
    w2: torch.Tensor
    """[b, d]; the module is (out, in) = (a * b, c * d)"""

    @property
    def shape(self) -> tuple[int, int]:
        return self.w1.shape[0] * self.w2.shape[0], self.w1.shape[1] * self.w2.shape[1]

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if self.shape != shape:
            return f"kron(w1, w2) has shape (out, in) = {self.shape}, the base module is {shape}"
        return None

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return entries_rank(self.w1.numel() + self.w2.numel(), shape)

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        limit, held = entries_limit(shape, max_rank), self.w1.numel() + self.w2.numel()
        if held > limit:
            return f"the Kronecker factors hold {held} entries, over max_rank * (out + in) = {limit}"
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [("lokr_w1 x scaling", self.w1), ("lokr_w2", self.w2)]


def kron_cost(w1_shape: tuple[int, int], w2_shape: tuple[int, int]) -> int:
    """Multiply-adds per token of kron_apply (its cheaper order)."""
    (a, c), (b, d) = w1_shape, w2_shape
    return min(c * b * (d + a), a * d * (c + b))
