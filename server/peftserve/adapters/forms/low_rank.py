"""Additive low rank: y += x @ A.T @ B.T per token (LoRA, AdaLoRA, DoRA's update, LoHa from its factors)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from ..batch import AdapterBatch, SlotGroup
from ..workers import one_intra_op_thread, split_by_cost, workers
from . import low_rank_rows
from .base import Delta, Form, LayerSpec, Stage, triton_kernel
from .low_rank_rows import STACKS, RankStacks, RowsPlan


def low_rank_reference(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LowRankDelta | None]
) -> None:
    """Reference, one sequence at a time, straight from the batch's spans.

    Semantics: for every span (start, len, pairs) and token t in it,
        y[t] += sum_{(s, w) in pairs, slots[s] is not None} w * (x[t] @ A[s].T) @ B[s].T
    y: [T, out] updated in place; x: [T, in]. Tokens outside every span are not touched.
    """
    for start, length, pairs in batch.spans:
        xs = x[start : start + length]  # [n, in]
        delta = None
        for slot, weight in pairs:
            d = slots[slot]
            if d is None:
                continue
            term = weight * ((xs.to(d.a.dtype) @ d.a.T) @ d.b.T)  # [n, out]
            delta = term if delta is None else delta + term
        if delta is not None:
            y[start : start + length] += delta.to(y.dtype)


def low_rank_grouped(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LowRankDelta | None]
) -> None:
    """Fast path: one (x @ A.T) @ B.T per distinct slot of the step, over that slot's token group.

    Semantics: same as low_rank_reference. Contiguous groups read and update slices of x and y in
    place (no copies), single decode tokens use matrix-vector products (measured faster on CPU);
    scattered groups gather rows with index_select and scatter with index_add_. Mixture weights ride
    on alpha, or on the [n, r] intermediate when they vary within a group.
    """
    _add_groups(y, x, batch.groups, slots)


def low_rank_parallel(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LowRankDelta | None]
) -> None:
    """CPU fast path: the grouped kernel's products shared out among the intra-op threads.

    Semantics: same as low_rank_reference. The step's groups are cut into consecutive shares of about
    equal work (A and B bytes plus rows times rank), one per thread; each thread runs its share's
    products with one intra-op thread (workers.py says why). Shares write disjoint rows of y, so they
    run only when no token is in two groups (no mixture in the step); otherwise, or with one share,
    this is the grouped kernel.
    """
    pool = workers()
    groups = [g for g in batch.groups if slots[g.slot] is not None]
    if pool.size == 1 or len(groups) < 2 or not batch.disjoint:
        with one_intra_op_thread():  # every product on one thread, shared out or not: the same bits
            _add_groups(y, x, groups, slots)
        return
    ranks = [slots[g.slot].rank for g in groups]  # type: ignore[union-attr]
    # bytes of A and B over (in + out), and the rows' multiply-adds over (in + out), in one unit
    costs = [r * (WORDS_PER_PRODUCT + g.num_tokens) for r, g in zip(ranks, groups, strict=True)]
    shares = [groups[run.start : run.stop] for run in split_by_cost(costs, pool.size)]
    pool.run(lambda share: _add_groups(y, x, share, slots), shares)


def low_rank_compiled(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LowRankDelta | None]
) -> None:
    """CPU fast path: decode and prefill rows in one C++ pass per layer, long spans by the grouped kernel.

    Semantics: same as low_rank_reference. The tokens of spans of one adapter up to ROWS_SPAN_MAX
    tokens (decode, most prefill chunks), and the last `length % ROWS_SPAN_MAX` tokens of longer ones,
    run low_rank_rows' kernel over the layer's stacked factors, each row's bits its own; the rest of the
    longer spans, and mixtures, run low_rank_grouped on views of the same factors, each product on all
    intra-op threads: GEMMs of hundreds of rows, which torch's threads share well, where the parallel
    kernel's helper threads compete for the cores with the OpenMP threads still spinning after the base
    layer's parallel regions (bench-1b's trace in bf16 on 2 cores: prefill steps with adapters 1.20x the
    base model's on the parallel kernel, 1.08x on this; bench_trace_steps.py).
    """
    stacks: RankStacks = slots.derived[STACKS]  # type: ignore[attr-defined]
    if not low_rank_rows.usable(y.dtype):
        low_rank_parallel(y, x, batch, slots)
        return
    plan = batch.memo(low_rank_rows.PLAN, lambda: RowsPlan.of(batch))
    if plan.rows:
        low_rank_rows.add_rows(y, x, low_rank_rows.bucket_rows(batch, plan, stacks), stacks)
    if plan.rest is not None:
        low_rank_grouped(y, x, plan.rest, slots)


WORDS_PER_PRODUCT = 8
"""What reading one row of A and B costs next to one token's multiply-adds with them (bandwidth-bound
on CPU: a word read costs about what a few multiply-adds do); only sets the balance of the shares."""


def _add_groups(
    y: torch.Tensor, x: torch.Tensor, groups: Iterable[SlotGroup], slots: Sequence[LowRankDelta | None]
) -> None:
    for g in groups:
        d = slots[g.slot]
        if d is None:
            continue
        if d.a.dtype != x.dtype:  # float32 factors under a bfloat16 model on CPU (LowRankForm.load)
            _add_group_widened(y, x, g, d)
        elif g.index is None and g.num_tokens == 1:  # a decode token: matrix-vector products
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


def _add_group_widened(y: torch.Tensor, x: torch.Tensor, g: SlotGroup, d: LowRankDelta) -> None:
    """One group's products in the factors' (wider) dtype, rounded once into y."""
    if g.index is None:
        h = x[g.start : g.stop].to(d.a.dtype) @ d.a.T  # [n, r]
        y[g.start : g.stop] += (h @ d.b.T).mul_(g.scale).to(y.dtype)
    else:
        h = x.index_select(0, g.index).to(d.a.dtype) @ d.a.T  # [n, r]
        if g.weight is not None:
            h.mul_(g.weight)
        y.index_add_(0, g.index, (h @ d.b.T).mul_(g.scale).to(y.dtype))


class LowRankForm(Form):
    stage = Stage.ADD
    name = "low_rank"
    kernels = {
        "reference": low_rank_reference,
        "grouped": low_rank_grouped,
        "parallel": low_rank_parallel,
        "compiled": low_rank_compiled,
        "triton": triton_kernel("low_rank_triton"),
    }

    def __init__(self, spec: LayerSpec) -> None:
        super().__init__(spec)
        self.stacks = RankStacks(spec.num_slots) if spec.kernels == "compiled" else None
        """With the compiled kernel: the factors, stacked by rank; the slots hold views of them."""
        if self.stacks is not None:
            self.slots.derived[STACKS] = self.stacks

    def load(self, slot: int, delta: Delta) -> None:
        """Hold the delta. With the compiled kernel its factors are copied into the layer's stacks in the
        model's dtype and held as views of them. With the grouped or parallel kernel on CPU a bfloat16 or
        float16 delta is held in float32 (twice its bytes), since torch's CPU matrix-vector products in
        bfloat16 are ~3.5x slower than in float32 at these sizes (benchmarks/README.md, "bfloat16 on
        CPU"), and the products then round once, not twice."""
        assert isinstance(delta, LowRankDelta)
        if self.stacks is not None:  # copied into the stacks (in the model's dtype), held as views
            for moved in self.stacks.put(slot, delta):
                super().load(moved, self.stacks.view(moved, delta if moved == slot else self.slots[moved]))
            return
        if delta.a.device.type == "cpu" and delta.a.dtype in NARROW and self.spec.kernels in WIDENING:
            delta = replace(delta, a=delta.a.float(), b=delta.b.float())
        super().load(slot, delta)

    def clear(self, slot: int) -> None:
        if self.stacks is not None:
            self.stacks.remove(slot)
        super().clear(slot)

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.slots)


NARROW = (torch.bfloat16, torch.float16)
WIDENING = ("grouped", "parallel")
"""The CPU kernels that take float32 factors beside a narrower model (the reference and Triton do not)."""


@dataclass(frozen=True)
class LowRankDelta(Delta):
    """dW = b @ a of one module, every scaling already folded into b."""

    form: ClassVar[type[Form]] = LowRankForm

    a: torch.Tensor
    """[r, in]"""
    b: torch.Tensor
    """[out, r]"""
    origin: str = ""
    """How a non-LoRA kind became low rank (e.g. 'LoHa r=4 x 4'), for limit messages; '' for LoRA."""

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module it updates."""
        return self.b.shape[0], self.a.shape[1]

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if self.shape != shape:
            return f"lora_B/lora_A give shape (out, in) = {self.shape}, the base module is {shape}"
        return None

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return self.rank

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        if self.rank > max_rank:
            served = f" ({self.origin})" if self.origin else ""
            return f"rank {self.rank}{served} exceeds the server's max rank {max_rank}"
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [("lora_A", self.a), ("lora_B x scaling", self.b)]
