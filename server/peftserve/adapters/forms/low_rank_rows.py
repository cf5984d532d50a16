"""The CPU's low-rank kernel for rows: each token's two products in one C++ pass per layer.

A decode step has one token per sequence and, with many tenants, nearly as many distinct adapters as
rows; run as a Python loop of two small products per adapter (the grouped kernel) its cost is the count of
operations, not the bytes of the factors. Here a layer keeps its slots' factors stacked by rank
(`RankStacks`: A as [n, R, in] and Bᵀ as [n, R, out] per rank bucket R), and the step's tokens of spans
of one adapter (decode tokens, and prefill chunks up to ROWS_SPAN_MAX tokens) run as rows through one
loop of our own (low_rank_rows.cpp):

    y[row_i] += w_i * (x[row_i] · A[index_i]ᵀ) · Bᵀ[index_i]      (float32, rounded once, in place)

reading each row's factors where they lie (no gathered copy), in the model's dtype, on all intra-op
threads, consecutive rows of one adapter four at a time (each load of its factors serves all four). A
row's bits do not depend on the other rows of its step (each row keeps its own sums), so a request's
adapter deltas are the same alone or batched. Longer spans (ROWS_SPAN_MAX: their multiples of it, the
rest as rows) and mixtures run the grouped kernel on views of the same stacks: products of many rows
with one adapter are what GEMMs do best.

Why C++ of our own: the same loop written in torch and compiled by torch.compile became reductions with
one accumulator per output, each waiting on the latency of its previous addition, and every call paid
~56 us of guards; bench-1b's 28 adapter layers, 64 rows over 51 adapters in bf16 on the 2-core dev box
take 14.5 ms a step that way and 9.7 ms this way, the factors' bytes at the memory's pace
(bench_rows_kernel.py; benchmarks/README.md, "The rows kernel in C++").

The stacks pad each adapter to its bucket (powers of two from RANK_FLOOR: rank 12 is held as 16) and
grow by doubling (up to the layer's slots), so an unusual rank costs its own bucket, not every adapter's
padding. Within a bucket a step's rows go in stack order, so rows of one adapter run one after the other
and find its factors in cache.
"""

from __future__ import annotations

import itertools
import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from peftserve import native

from ..batch import AdapterBatch

if TYPE_CHECKING:
    from .low_rank import LowRankDelta

log = logging.getLogger(__name__)

RANK_FLOOR = 8
"""Smallest bucket: ranks 1-8 share it. The kernel takes ranks in fours, so every bucket is a multiple
of 4."""
ROWS_SPAN_MAX = 256
"""Spans of one adapter up to this many tokens run as rows; longer ones give the grouped kernel's GEMMs
their first multiple of it and run the rest as rows. The kernel runs a span's rows four at a time, at
27-30 us a token over bench-1b's 28 layers in bf16 on the 2-core dev box whatever the span's length; the
GEMMs cost more per token the shorter the span: 8 spans of 32 tokens took 7.6 ms as rows and 20.8 ms as
GEMMs, of 128 tokens 28.4 and 39.5 ms, 4 of 256 tokens 28.1 and 29.7 ms, 2 of 512 tokens 27.4 and 26.0
ms, one of 1,024 tokens 27.7 and 23.5 ms; in float32 256 tokens 54.8 and 60.3 ms, 1,024 tokens 57.7
and 48.2 ms (bench_rows_kernel.py --prefill). Rows also give each of a prompt's tokens the adapter delta
it has alone, bit for bit, however the prompt is chunked or batched.

The GEMMs take a multiple of this many tokens: oneDNN builds a kernel for each new row count of a
product (the pair of a span's products at bench-1b's widths: 1.2 ms the first time, 0.26 ms after) and
keeps 1,024 of them, shared with the base model's linears. Prompts of every length would otherwise keep
it building: a product sees at most max_batched_tokens / 256 row counts (4 at the default), but for an
adapter that is also in a mixture in the same step (the grouped kernel then takes its mixture's tokens
with its spans', any count)."""
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


class _Layout:
    """One placement of slots in a RankStacks, as an identity: one object for each placement some layer
    holds (_layouts maps the placement to it). A step's row lists are memoized by it (bucket_rows), and a
    lookup by identity costs nothing, where comparing two equal sets of every slot's place cost ~7 us for
    each of a step's 28 layers at 51 adapters."""

    __slots__ = ("__weakref__",)


_layouts: weakref.WeakValueDictionary[frozenset, _Layout] = weakref.WeakValueDictionary()
"""The placements layers hold now, each once (a placement no layer holds any longer drops out)."""


def _layout_of(where: dict[int, tuple[int, int]]) -> _Layout:
    """The one _Layout of this placement (slot -> (bucket, index)). Two threads loading at once may each
    make one: their steps then build the row lists twice, nothing worse."""
    places = frozenset(where.items())
    layout = _layouts.get(places)
    if layout is None:
        layout = _layouts[places] = _Layout()
    return layout


class RankStacks:
    """One layer's low-rank factors stacked by rank bucket; slot deltas are views into them (one copy)."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        """The most a bucket ever holds (its capacity stops there)."""
        self.stacks: dict[int, _Stack] = {}
        self.where: dict[int, tuple[int, int]] = {}
        """slot -> (bucket, index)"""
        self.layout = _layout_of(self.where)
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
        self.layout = _layout_of(self.where)
        return [s for s in stack.owner if s is not None] if grown else [slot]

    def remove(self, slot: int) -> None:
        found = self.where.pop(slot, None)
        if found is not None:
            self.stacks[found[0]].owner[found[1]] = None
            self.layout = _layout_of(self.where)

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
    """A step's tokens split for the low-rank kernels: rows, and spans for the grouped kernel's GEMMs."""

    rows: list[tuple[int, int, float]]
    """(token, slot, weight) of every token of a span with one adapter and at most ROWS_SPAN_MAX tokens,
    and of the last `length % ROWS_SPAN_MAX` tokens of a longer one"""
    rest: AdapterBatch | None
    """The other tokens (longer spans' first multiple of ROWS_SPAN_MAX tokens, mixtures) as their own
    batch, for the grouped kernel; None if none."""

    @classmethod
    def of(cls, batch: AdapterBatch) -> RowsPlan:
        rows, rest = [], []
        for start, length, pairs in batch.spans:
            if len(pairs) > 1:
                rest.append((start, length, pairs))
                continue
            ((slot, weight),) = pairs
            head = length - length % ROWS_SPAN_MAX if length > ROWS_SPAN_MAX else 0
            if head:
                rest.append((start, head, pairs))
            rows += [(start + t, slot, weight) for t in range(head, length)]
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
        # by bucket, then stack index: a bucket's rows of one adapter run one after the other
        placed = sorted(
            (stacks.where[slot], token, weight) for token, slot, weight in plan.rows if slot in stacks.where
        )
        return [
            _BucketRows(
                bucket,
                torch.tensor([token for _, token, _ in rows], dtype=torch.long),
                torch.tensor([index for (_, index), _, _ in rows], dtype=torch.long),
                torch.tensor([weight for _, _, weight in rows], dtype=torch.float32),
            )
            for bucket, rows in ((b, list(g)) for b, g in itertools.groupby(placed, key=lambda p: p[0][0]))
        ]

    return batch.memo((PLAN, stacks.layout), build)


_PARAMETERS = (
    *("const SCALAR*", "int64_t", "SCALAR*", "int64_t"),  # x, y: each with its row stride
    *("const int64_t*", "const int64_t*", "const float*", "int64_t"),  # token, index, weight: n each
    *("const SCALAR*", "const SCALAR*", "int64_t", "int64_t", "int64_t"),  # a, bt: rank, in, out
    *("int64_t", "int64_t"),  # bf16_dot, threads
)
"""`kernel`'s parameters as inductor's bindings parse its arguments (a tensor as its data pointer)."""
KERNEL = native.Kernel("low-rank-rows", Path(__file__).with_suffix(".cpp"), _PARAMETERS)
"""low_rank_rows.cpp per dtype (peftserve/native.py: built once per machine, with inductor's flags for
this CPU's vector units, then loaded in milliseconds; a call costs microseconds, where a
torch.compile'd function's guards cost ~56 us). A build takes 1.4 s on the 2-core Intel Xeon, plus
about 7 s of inductor's set-up when it is the first kernel a process builds.
In bfloat16 the product by A runs on the bf16 dot-product instruction where the CPU has it
(native.bf16_dot; low_rank_rows.cpp says how it rounds)."""
unavailable: str | None = None
"""Why the kernel cannot be built here (warm_up found out; e.g. no C++ compiler): the form then runs
the parallel kernel for every token."""
building: set[torch.dtype] = set()
"""Dtypes whose kernel a warm-up beside the steps is building (build_work): until it is built, the
form runs the parallel kernel, rather than a step waiting for the build (about 1-2 s). Process-wide, as
the kernel is: a layer called as the build ends runs the kernel, the layer before it the parallel one,
each exact to the reference within rounding."""


def add_rows(y: torch.Tensor, x: torch.Tensor, parts: Sequence[_BucketRows], stacks: RankStacks) -> None:
    """Each bucket's rows of y (a layer's output, in the stacks' dtype) updated in place by the kernel."""
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    if y.stride(-1) != 1 and y.shape[-1] > 1:  # not a layer's output: work on a contiguous copy
        rows = y.contiguous()
        add_rows(rows, x, parts, stacks)
        y.copy_(rows)
        return
    kernel, dot, threads = KERNEL.get(y.dtype), native.bf16_dot, torch.get_num_threads()
    for part in parts:
        a, bt = stacks.stacks[part.bucket].a, stacks.stacks[part.bucket].bt  # [c, R, in], [c, R, out]
        if not a.dtype == x.dtype == y.dtype:  # the kernel reads raw memory: a mismatch must never reach it
            raise TypeError(f"the layer's factors are {a.dtype}, its input {x.dtype} and output {y.dtype}")
        rows = (part.rows, part.index, part.weight, len(part.rows))
        kernel(x, x.stride(0), y, y.stride(0), *rows, a, bt, *a.shape[1:], bt.shape[2], dot, threads)


def usable(dtype: torch.dtype) -> bool:
    """Whether the kernel serves `dtype` now: it can be built here, for this dtype, and no warm-up beside
    the steps is building it."""
    return unavailable is None and dtype in native.SCALARS and dtype not in building


def build_work(dtype: torch.dtype) -> Callable[[], str] | None:
    """The kernel's build for `dtype` as work for the runner's warm-up (ModelRunner, warm_ups), which
    may run it beside the steps; None when there is nothing to build. `dtype` is `building` from this
    call until the build ends: call it when the work is handed to a thread."""
    if unavailable is not None or dtype not in native.SCALARS:
        return None
    if KERNEL.get(dtype, build=False) is not None:  # built on an earlier start: loaded in milliseconds
        return None
    building.add(dtype)

    def build() -> str:
        try:
            warm_up(dtype)
        finally:
            building.discard(dtype)
        return "the low-rank rows kernel built" if unavailable is None else "no low-rank rows kernel"

    return build


def warm_up(dtype: torch.dtype) -> None:
    """Build the kernel for `dtype` before serving. If it cannot be built, say why once and leave it
    `unavailable`."""
    global unavailable
    if unavailable is not None or dtype not in native.SCALARS:
        return
    try:
        KERNEL.get(dtype)
    except Exception as e:  # noqa: BLE001 - any build failure: serve with the parallel kernel instead
        first_line = str(e).strip().split("\n", 1)[0]  # a compile error goes on with the compiler's output
        unavailable = f"{type(e).__name__}: {first_line}"
        log.warning(
            "the low-rank rows kernel is unavailable (%s): decode rows run the parallel one", unavailable
        )
        log.debug("building the low-rank rows kernel failed", exc_info=True)
