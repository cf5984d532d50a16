"""The CPU's low-rank kernel for decode rows: every row's two products in one compiled pass per layer.

A decode step has one token per sequence and, with many tenants, nearly as many distinct adapters as
rows; run as a Python loop of two small products per adapter (the grouped kernel) its cost is the count of
operations, not the bytes of the factors. Here a layer keeps its slots' factors stacked by rank
(`RankStacks`: A as [n, R, in] and Bᵀ as [n, R, out] per rank bucket R), and the step's single-token
rows of one adapter each run as one fused loop that torch.compile (inductor's C++ on CPU) generates:

    out[i] = y[row_i] + w_i * (x[row_i] · A[index_i]ᵀ) · Bᵀ[index_i]      (float32, rounded once)

reading each row's factors where they lie (no gathered copy), in the model's dtype, on all intra-op
threads. A row's bits do not depend on the other rows of its step (each row is its own loop iteration),
so a request's outputs are the same alone or batched. Multi-token spans (prefill) and mixtures run the
grouped kernel on views of the same stacks: products of many rows with one adapter are what GEMMs do
best.

The stacks pad each adapter to its bucket (powers of two from RANK_FLOOR: rank 12 is held as 16) and
grow by doubling (up to the layer's slots), so an unusual rank costs its own bucket, not every adapter's
padding.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.fx.experimental._config as fx_config

from ..batch import AdapterBatch

if TYPE_CHECKING:
    from .low_rank import LowRankDelta

log = logging.getLogger(__name__)

RANK_FLOOR = 8
"""Smallest bucket: ranks 1-8 share it (a bucket of 1 would also be a shape torch.compile specializes)."""
RECOMPILE_LIMIT = 64
"""Graphs compiled per process: per dtype and class of in_features (inductor's vectorization bound), three
(`_compile_for`); far fewer than this."""
STACKS = "stacks"
"""SlotList.derived key of a layer's RankStacks."""
PLAN = "low-rank-rows"
"""AdapterBatch.memo key of the step's RowsPlan."""


def bucket_of(rank: int) -> int:
    """The stacked rank an adapter of `rank` is held at: the next power of two, at least RANK_FLOOR."""
    return max(RANK_FLOOR, 1 << (rank - 1).bit_length())


@dataclass
class _Stack:
    """The factors of one rank bucket: index i holds one slot's A [R, in] and Bᵀ [R, out], zero-padded."""

    a: torch.Tensor
    """[capacity, R, in]"""
    bt: torch.Tensor
    """[capacity, R, out]"""
    owner: list[int | None]
    """Slot held at each index (None: free)."""
    rank: list[int]
    """True rank held at each index."""


class RankStacks:
    """One layer's low-rank factors stacked by rank bucket; slot deltas are views into them (one copy)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        """The most a bucket ever holds (its capacity stops there)."""
        self.stacks: dict[int, _Stack] = {}
        self.where: dict[int, tuple[int, int]] = {}
        """slot -> (bucket, index)"""
        self.layout: frozenset[tuple[int, tuple[int, int]]] = frozenset()
        """`where` as a key: layers whose stacks place every slot alike share a step's row lists."""

    def put(self, slot: int, delta: LowRankDelta) -> list[int]:
        """Copy a slot's factors into its bucket. Returns the slots whose views must be taken again
        (`view`): this one, and every other slot of the bucket when it grew (its storage moved)."""
        self.remove(slot)
        bucket = bucket_of(delta.rank)
        stack = self.stacks.get(bucket)
        grown = stack is None or None not in stack.owner
        if grown:
            stack = self._grow(bucket, stack, delta)
        index = stack.owner.index(None)
        stack.a[index].zero_()[: delta.rank] = delta.a
        stack.bt[index].zero_()[: delta.rank] = delta.b.T
        stack.owner[index], stack.rank[index] = slot, delta.rank
        self.where[slot] = (bucket, index)
        self.layout = frozenset(self.where.items())
        return [s for s in stack.owner if s is not None] if grown else [slot]

    def remove(self, slot: int) -> None:
        found = self.where.pop(slot, None)
        if found is not None:
            self.stacks[found[0]].owner[found[1]] = None
            self.layout = frozenset(self.where.items())

    def view(self, slot: int, delta: LowRankDelta) -> LowRankDelta:
        """delta (the slot's) with its factors as views of the stack: A [r, in], B [out, r]."""
        bucket, index = self.where[slot]
        stack = self.stacks[bucket]
        rank = stack.rank[index]
        return replace(delta, a=stack.a[index, :rank], b=stack.bt[index, :rank].T)

    def _grow(self, bucket: int, stack: _Stack | None, delta: LowRankDelta) -> _Stack:
        """The bucket with twice its capacity (2 at first, the layer's slots at most), its held factors
        copied over."""
        held = 0 if stack is None else len(stack.owner)
        capacity = max(2, min(2 * held, self.num_slots))
        # Plain tensors wherever a load runs, in a step (inference mode) or not: the graphs expect them.
        with torch.inference_mode(False):
            a = delta.a.new_zeros(capacity, bucket, delta.a.shape[1])
            bt = delta.b.new_zeros(capacity, bucket, delta.b.shape[0])
        grown = _Stack(a, bt, [None] * capacity, [0] * capacity)
        if stack is not None:
            a[:held], bt[:held] = stack.a, stack.bt
            grown.owner[:held], grown.rank[:held] = stack.owner, stack.rank
        self.stacks[bucket] = grown
        return grown

    @property
    def nbytes(self) -> int:
        """Bytes the stacks take, padding and free capacity included."""
        return sum(t.numel() * t.element_size() for s in self.stacks.values() for t in (s.a, s.bt))


@dataclass(frozen=True)
class RowsPlan:
    """A step's tokens split for the low-rank kernels: single-token spans of one adapter, the rest."""

    rows: list[tuple[int, int, float]]
    """(token, slot, weight) of every single-token span with one adapter"""
    rest: AdapterBatch | None
    """The other spans (prefill, mixtures) as their own batch, for the grouped kernel; None if none."""

    @classmethod
    def of(cls, batch: AdapterBatch) -> RowsPlan:
        rows, rest = [], []
        for start, length, pairs in batch.spans:
            if length == 1 and len(pairs) == 1:
                rows.append((start, pairs[0][0], pairs[0][1]))
            else:
                rest.append((start, length, pairs))
        others = AdapterBatch.build(rest, batch.num_tokens, batch.device) if rest else None
        return cls(rows, others)


@dataclass(frozen=True)
class _BucketRows:
    """The rows of one bucket in one layer: token rows, stack indices, weights (int64, int64, float32)."""

    bucket: int
    rows: torch.Tensor
    index: torch.Tensor
    weight: torch.Tensor


def bucket_rows(batch: AdapterBatch, plan: RowsPlan, stacks: RankStacks) -> list[_BucketRows]:
    """The plan's rows whose slots hold a delta in this layer, by bucket. Layers whose stacks place every
    slot alike (the same adapters, ranks and load order: most layers) share one build per step."""

    def build() -> list[_BucketRows]:
        by_bucket: dict[int, tuple[list[int], list[int], list[float]]] = {}
        for token, slot, weight in plan.rows:
            where = stacks.where.get(slot)
            if where is not None:
                rows, index, weights = by_bucket.setdefault(where[0], ([], [], []))
                rows.append(token)
                index.append(where[1])
                weights.append(weight)
        return [
            _BucketRows(
                bucket,
                torch.tensor(rows, dtype=torch.long),
                torch.tensor(index, dtype=torch.long),
                torch.tensor(weights, dtype=torch.float32),
            )
            for bucket, (rows, index, weights) in sorted(by_bucket.items())
        ]

    return batch.memo((PLAN, stacks.layout), build)


def _row_products(y, x, rows, index, weight, a, bt):
    """y[rows] + weight * (x[rows] @ a[index]ᵀ) @ bt[index], row by row, in float32, rounded once.
    y: [T, out]; x: [T, in]; rows, index: [n] int64; weight: [n] float32; a: [c, R, in]; bt: [c, R, out]."""
    xr = x[rows].float()  # [n, in]
    h = (a[index].float() * xr[:, None, :]).sum(-1) * weight[:, None]  # [n, R]
    d = (h[:, :, None] * bt[index].float()).sum(1)  # [n, out]
    return (y[rows].float() + d).to(y.dtype)


@functools.cache
def _compiled():
    """_row_products compiled once per process, every size symbolic: the graphs `_compile_for` lists per
    dtype, whatever the model's shapes, ranks and slot counts.
    With the settings its calls run under: sizes are not "duck"-matched (a row count equal to a stack's
    capacity by chance must not become a guard that recompiles once they differ).

    `cpp.dynamic_threads`: every loop nest is shared out among the threads at run time. Without it
    inductor decides from the sizes of the first compile (the warm-up's small ones, or whichever
    process filled its on-disk cache first) and ran the second product on one thread (bench-1b's
    adapter deltas, bf16, 64 rows: 32.4 -> 24.5 ms per decode step on the 2-core dev box;
    benchmarks/README.md, "Both threads, warm-ups that match the steps")."""
    settings = (
        torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT),
        fx_config.patch(use_duck_shape=False),
    )
    options = {"cpp.dynamic_threads": True}
    return torch.compile(_row_products, dynamic=True, fullgraph=True, options=options), settings


def row_products(y, x, rows, index, weight, a, bt) -> torch.Tensor:
    """_row_products, compiled."""
    kernel, (dynamo_settings, fx_settings) = _compiled()
    with dynamo_settings, fx_settings:
        return kernel(y, x, rows, index, weight, a, bt)


unavailable: str | None = None
"""Why the kernel cannot be compiled here (warm_up found out; e.g. no C++ compiler): the form then runs
the parallel kernel for every token."""


def add_rows(y: torch.Tensor, x: torch.Tensor, parts: Sequence[_BucketRows], stacks: RankStacks) -> None:
    """Each bucket's rows of y, replaced by the compiled pass over them."""
    for part in parts:
        stack = stacks.stacks[part.bucket]
        y.index_copy_(0, part.rows, row_products(y, x, part.rows, part.index, part.weight, stack.a, stack.bt))


def warm_up(dtype: torch.dtype, in_features: Iterable[int]) -> None:
    """Compile the kernel for `dtype` and the layers' input widths (inductor's vectorized loops guard on
    the width), for one row and several, before serving (bench-1b's two widths in bf16 on the 2-core dev
    box: 18 s cold, 3.8 s from inductor's on-disk cache). If it cannot be compiled, say why once and
    leave it `unavailable`."""
    global unavailable
    if unavailable is not None:
        return
    try:
        _compile_for(dtype, sorted(set(in_features)))
    except Exception as e:  # noqa: BLE001 - any compile failure: serve with the parallel kernel instead
        unavailable = f"{type(e).__name__}: {e}"
        log.warning("the compiled low-rank kernel is unavailable (%s): decode rows run the parallel one", e)


def _compile_for(dtype: torch.dtype, widths: list[int]) -> None:
    """Every graph serving uses, with the tensors it is called with: per width class, one row of one
    token, several rows, one row of several tokens (a size of 1 is a constant to torch.compile, so each
    is a graph of its own); the stacks as `RankStacks` makes them (plain tensors), the step's tensors in
    inference mode as the runner's step makes them (dynamo guards on both)."""
    for width in widths:
        a = torch.zeros(2, RANK_FLOOR, width, dtype=dtype)
        bt = torch.zeros(2, RANK_FLOOR, 16, dtype=dtype)
        for tokens, rows in ((1, [0]), (2, [0, 1]), (2, [1])):
            with torch.inference_mode():
                y, x = torch.zeros(tokens, 16, dtype=dtype), torch.zeros(tokens, width, dtype=dtype)
                index = torch.tensor(rows)
                row_products(y, x, index, index % 2, torch.ones(len(rows)), a, bt)
