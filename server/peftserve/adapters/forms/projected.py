"""Low rank through shared frozen projections (VeRA): y += lambda_b * ((lambda_d * (x @ A.T)) @ B.T).

A and B are the adapter's frozen random projections, sliced per module ([r, in] of A, [out, r] of B):
held on the device once per content digest whatever the number of adapters and layers using them
(SharedTensors), while a slot holds only the two vectors. Slots sharing a projection are computed
together: one x @ A.T and one @ B.T over all their tokens, the vectors applied per row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..batch import AdapterBatch
from .base import Delta, Form, LayerSpec, SlotList, Stage, triton_kernel


@dataclass(frozen=True)
class Projected:
    """A slot's VeRA module on the device: its vectors and the shared projection slices."""

    a: torch.Tensor
    """[r, in] (a view of the shared A)"""
    b: torch.Tensor
    """[out, r] (a view of the shared B)"""
    lambda_d: torch.Tensor
    """[r]"""
    lambda_b: torch.Tensor
    """[out]"""
    key: str


def projected_reference(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[Projected | None]
) -> None:
    """Reference, one sequence at a time.

    Semantics: for every span (start, len, pairs) and token t in it,
        y[t] += sum_{(s, w) in pairs} w * lambda_b[s] * ((lambda_d[s] * (x[t] @ A[s].T)) @ B[s].T)
    """
    for start, length, pairs in batch.spans:
        xs = x[start : start + length]  # [n, in]
        for slot, weight in pairs:
            p = slots[slot]
            if p is not None:
                h = (xs @ p.a.T) * p.lambda_d  # [n, r]
                y[start : start + length] += weight * ((h @ p.b.T) * p.lambda_b)


def projected_grouped(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[Projected | None]
) -> None:
    """Fast path: per shared projection, one x @ A.T and one @ B.T over the tokens of all its slots.

    Semantics: same as projected_reference. The slots' tokens are gathered into one [N, in] batch (a
    token of a mixture once per slot), scaled per row by its slot's vectors (stacked per layer)
    and mixture weight, and added back with index_add_.
    """
    by_key: dict[str, list[int]] = {}
    for slot in sorted(batch.slots):
        p = slots[slot]
        if p is not None:
            by_key.setdefault(p.key, []).append(slot)
    for members in by_key.values():
        rows = batch.gather(tuple(members))
        first = slots[members[0]]
        lambda_d = torch.stack([slots[s].lambda_d for s in members])[rows.member]  # [N, r]
        lambda_b = torch.stack([slots[s].lambda_b for s in members])[rows.member]  # [N, out]
        h = (x.index_select(0, rows.index) @ first.a.T).mul_(lambda_d).mul_(rows.weight)  # [N, r]
        y.index_add_(0, rows.index, (h @ first.b.T).mul_(lambda_b))


class ProjectedForm(Form):
    stage = Stage.ADD
    name = "projected"
    kernels = {
        "reference": projected_reference,
        "grouped": projected_grouped,
        "triton": triton_kernel("projected_triton"),
    }

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.projected: SlotList = SlotList(spec.num_slots)

    def load(self, slot: int, delta: Delta) -> None:
        assert isinstance(delta, ProjectedDelta)
        self.clear(slot)
        device, dtype = delta.lambda_d.device, delta.lambda_d.dtype
        shared = self.spec.shared
        a = shared.acquire(("vera_A", delta.key), lambda: delta.vera_a.to(device, dtype).contiguous())
        b = shared.acquire(("vera_B", delta.key), lambda: delta.vera_b.to(device, dtype).contiguous())
        out_features, in_features = self.spec.out_features, self.spec.in_features
        self.projected[slot] = Projected(
            a=a[:, :in_features], b=b[:out_features], lambda_d=delta.lambda_d, lambda_b=delta.lambda_b,
            key=delta.key,
        )  # fmt: skip
        super().load(slot, delta)

    def clear(self, slot: int) -> None:
        p = self.projected[slot]
        if p is not None:
            self.spec.shared.release(("vera_A", p.key))
            self.spec.shared.release(("vera_B", p.key))
            self.projected[slot] = None
        super().clear(slot)

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.projected)


@dataclass(frozen=True)
class ProjectedDelta(Delta):
    """A VeRA module: its two vectors, and the adapter's whole shared projections (sliced per module)."""

    form: ClassVar[type[Form]] = ProjectedForm

    lambda_d: torch.Tensor
    """[r]"""
    lambda_b: torch.Tensor
    """[out]"""
    vera_a: torch.Tensor
    """[r, max_in], shared by every module of the adapter; stays on the host until a form loads it."""
    vera_b: torch.Tensor
    """[max_out, r], likewise."""
    key: str
    """Content digest of (vera_a, vera_b): adapters with the same projections share one device copy."""

    @property
    def rank(self) -> int:
        return self.lambda_d.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"lambda_d": self.lambda_d, "lambda_b": self.lambda_b}

    def shared(self) -> dict[tuple, torch.Tensor]:
        return {("vera_A", self.key): self.vera_a, ("vera_B", self.key): self.vera_b}

    def misfit(self, shape: tuple[int, int]) -> str | None:
        out_features, in_features = shape
        r = self.rank
        if self.lambda_b.shape != (out_features,):
            return f"vera_lambda_b has {self.lambda_b.shape[0]} entries, the base module gives {out_features}"
        if self.vera_a.shape[0] != r or self.vera_b.shape[1] != r:
            return f"vera_lambda_d has rank {r}, the projections vera_A/vera_B rank {self.vera_a.shape[0]}"
        if self.vera_a.shape[1] < in_features or self.vera_b.shape[0] < out_features:
            return (
                f"the projections vera_A {tuple(self.vera_a.shape)} / vera_B {tuple(self.vera_b.shape)} "
                f"are smaller than the base module's (out, in) = {shape}"
            )
        return None

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return self.rank

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        if self.rank > max_rank:
            return f"VeRA rank {self.rank} exceeds the server's max rank {max_rank}"
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [("vera_lambda_d", self.lambda_d), ("vera_lambda_b", self.lambda_b)]
