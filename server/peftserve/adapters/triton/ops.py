"""The forms' 'triton' kernels: the step's plan, each layer's slot table, and the launches.

Each function has the signature of the form's other kernels and the same Semantics as its reference
(forms/*.py). Launches per form, layer and step: two for low rank and VeRA (shrink, expand), one for
every other form, however many adapters the step holds.

A layer's slot table ([num_slots, TABLE_W] int64 on the device) holds each slot's data pointers and sizes
(columns in kernels.py). It is rebuilt, in place so that a captured CUDA graph keeps reading it, when a
slot of the form changes (SlotList.revision), and keeps alive what it derived (a sparse delta's entries
sorted by row).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import triton

from ..batch import AdapterBatch
from ..forms import (
    DenseDelta,
    DenseForm,
    Form,
    InputScaleDelta,
    KroneckerDelta,
    KroneckerForm,
    LowRankDelta,
    LowRankForm,
    OutputScaleDelta,
    ProjectedForm,
    SlotList,
    SparseDelta,
    SparseForm,
)
from ..forms.projected import Projected
from . import kernels as k
from .plan import KernelPlan, build_plan

INTERPRET = bool(triton.knobs.runtime.interpret)
"""Kernels were defined under Triton's interpreter (TRITON_INTERPRET=1, read when they were defined)."""
PLAN_KEY = "triton-plan"
"""The AdapterBatch.memo key of the step's KernelPlan (a captured graph puts its static plan there)."""


def kernel_plan(batch: AdapterBatch) -> KernelPlan:
    return batch.memo(PLAN_KEY, lambda: build_plan(batch.spans, batch.device))


@dataclass
class _Table:
    revision: int
    table: torch.Tensor
    """[num_slots, TABLE_W] int64"""
    keep: list[torch.Tensor]
    """Tensors the table points to that no slot holds (derived at build)."""


Row = list[int]


def slot_table(
    slots: SlotList, row: Callable[[object, list[torch.Tensor]], Row], device: torch.device
) -> torch.Tensor:
    """The slots' table on `device`, rebuilt (in place) after a load or clear of the form."""
    cached = slots.derived.get("triton")
    if isinstance(cached, _Table) and cached.revision == slots.revision:
        return cached.table
    keep: list[torch.Tensor] = []
    rows = [row(d, keep) if d is not None else [0] * k.TABLE_W for d in slots]
    host = torch.tensor(rows, dtype=torch.int64).reshape(len(slots), k.TABLE_W)
    table = cached.table if isinstance(cached, _Table) else torch.empty_like(host, device=device)
    table.copy_(host)
    slots.derived["triton"] = _Table(slots.revision, table, keep)
    return table


def _row(**cols: int) -> Row:
    row = [0] * k.TABLE_W
    for name, value in cols.items():
        row[getattr(k, f"COL_{name.upper()}")] = value
    return row


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _block(n: int, low: int, high: int) -> int:
    return min(high, max(low, triton.next_power_of_2(max(n, 1))))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t with unit column stride (the kernels' assumption), copied only when it has not."""
    return t if t.stride(1) == 1 else t.contiguous()


def _step_rank(plan: KernelPlan, batch: AdapterBatch, slots: Sequence, rank: Callable[[object], int]) -> int:
    """Width of h: the largest rank of the step's slots here, or the captured plan's fixed bound."""
    if plan.rank_capacity:
        return plan.rank_capacity
    return max((rank(slots[s]) for s in batch.slots if slots[s] is not None), default=0)


def _shrink_expand(
    y: torch.Tensor, x: torch.Tensor, plan: KernelPlan, table: torch.Tensor, rank: int, vectors: bool
) -> None:
    if rank == 0 or plan.num_tiles == 0:
        return
    x = _rows(x)
    h = torch.empty(plan.h_rows, rank, dtype=torch.float32, device=y.device)  # [H, r]
    block_r = _block(rank, 16, 64)
    k.shrink_kernel[(plan.num_tiles, plan.max_pairs, triton.cdiv(rank, block_r))](
        x, h, plan.tokens, plan.tiles, plan.groups, plan.pairs, table,
        plan.num_tiles, plan.num_groups, plan.num_pairs, x.shape[1], x.stride(0), h.stride(0),
        HAS_VEC=vectors, BLOCK_M=plan.block_m, BLOCK_K=_block(x.shape[1], 16, 64), BLOCK_R=block_r,
        UPCAST=_upcast(x.dtype),
    )  # fmt: skip
    _expand(y, h, plan, table, vectors=vectors, h_is_x=False, kron=False, block_k=block_r)


def _expand(
    y: torch.Tensor,
    h: torch.Tensor,
    plan: KernelPlan,
    table: torch.Tensor,
    *,
    vectors: bool,
    h_is_x: bool,
    kron: bool,
    block_k: int,
) -> None:
    out_features = y.shape[1]
    block_n = _block(out_features, 16, 64)
    k.expand_kernel[(plan.num_tiles, triton.cdiv(out_features, block_n))](
        y, h, y, plan.tokens, plan.tiles, plan.groups, plan.pairs, plan.weights, table,
        plan.num_tiles, plan.num_groups, plan.num_pairs, out_features, y.stride(0), h.stride(0),
        H_IS_X=h_is_x, HAS_VEC=vectors, KRON=kron,
        BLOCK_M=plan.block_m, BLOCK_N=block_n, BLOCK_K=block_k, UPCAST=_upcast(y.dtype),
    )  # fmt: skip


# -- one function per form, each as its reference's Semantics ------------------------------------


def _low_rank_row(d: LowRankDelta, keep: list[torch.Tensor]) -> Row:
    return _row(a=d.a.data_ptr(), k=d.rank, a_stride=d.a.stride(0), b=d.b.data_ptr())


def low_rank_triton(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[LowRankDelta | None]
) -> None:
    """Semantics: as low_rank_reference. One shrink and one expand launch."""
    plan = kernel_plan(batch)
    table = slot_table(slots, _low_rank_row, y.device)
    _shrink_expand(y, x, plan, table, _step_rank(plan, batch, slots, lambda d: d.rank), vectors=False)


def _projected_row(p: Projected, keep: list[torch.Tensor]) -> Row:
    return _row(
        a=p.a.data_ptr(), k=p.lambda_d.shape[0], a_stride=p.a.stride(0), vec_a=p.lambda_d.data_ptr(),
        b=p.b.data_ptr(), vec_b=p.lambda_b.data_ptr(),
    )  # fmt: skip


def projected_triton(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[Projected | None]
) -> None:
    """Semantics: as projected_reference. One shrink and one expand launch, lambda_d and lambda_b applied
    in them (the shared projections are read in place through each slot's views)."""
    plan = kernel_plan(batch)
    table = slot_table(slots, _projected_row, y.device)
    _shrink_expand(
        y, x, plan, table, _step_rank(plan, batch, slots, lambda p: p.lambda_d.shape[0]), vectors=True
    )


def _dense_row(d: DenseDelta, keep: list[torch.Tensor]) -> Row:
    return _row(k=d.weight.shape[1], b=d.weight.data_ptr())


def dense_triton(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[DenseDelta | None]
) -> None:
    """Semantics: as dense_reference. One launch (the expand, reading x as its h)."""
    plan = kernel_plan(batch)
    table = slot_table(slots, _dense_row, y.device)
    if plan.num_tiles:
        x = _rows(x)
        _expand(y, x, plan, table, vectors=False, h_is_x=True, kron=False, block_k=_block(x.shape[1], 16, 64))


def _kron_row(d: KroneckerDelta, keep: list[torch.Tensor]) -> Row:
    b, dd = d.w2.shape
    return _row(k=d.w1.shape[1] * dd, b=d.w1.data_ptr(), w2=d.w2.data_ptr(), kb=b, kd=dd)


def kron_triton(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[KroneckerDelta | None]
) -> None:
    """Semantics: as kron_reference. One launch; blocks of kron(w1, w2) are formed from the factors in
    the kernel (the slot holds only the factors, never the dense product)."""
    plan = kernel_plan(batch)
    table = slot_table(slots, _kron_row, y.device)
    if plan.num_tiles:
        x = _rows(x)
        _expand(y, x, plan, table, vectors=False, h_is_x=True, kron=True, block_k=_block(x.shape[1], 16, 64))


def _sparse_row(d: SparseDelta, keep: list[torch.Tensor], out_features: int) -> Row:
    """The entries sorted by output row, with where each row's entries start ([out + 1])."""
    order = torch.argsort(d.rows, stable=True)
    values, cols = d.values[order].contiguous(), d.cols[order].to(torch.int64).contiguous()
    starts = torch.zeros(out_features + 1, dtype=torch.int64, device=d.rows.device)
    starts[1:] = torch.cumsum(torch.bincount(d.rows, minlength=out_features), 0)
    keep += [values, cols, starts]
    return _row(k=1 if d.nnz else 0, b=values.data_ptr(), kb=starts.data_ptr(), kd=cols.data_ptr())


def sparse_triton(
    y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[SparseDelta | None]
) -> None:
    """Semantics: as sparse_reference. One launch, gathering each output row's entries (CSR): no dense
    [out, in] matrix, no atomics."""
    plan = kernel_plan(batch)
    table = slot_table(slots, lambda d, keep: _sparse_row(d, keep, y.shape[1]), y.device)
    if not plan.num_tiles:
        return
    x = _rows(x)
    block_n = _block(y.shape[1], 16, 64)
    k.sparse_kernel[(plan.num_tiles, triton.cdiv(y.shape[1], block_n))](
        y, x, plan.tokens, plan.tiles, plan.groups, plan.pairs, plan.weights, table,
        plan.num_tiles, plan.num_groups, y.shape[1], y.stride(0), x.stride(0),
        BLOCK_M=plan.block_m, BLOCK_N=block_n,
    )  # fmt: skip


def _scale_row(d: InputScaleDelta | OutputScaleDelta, keep: list[torch.Tensor]) -> Row:
    no_bias = isinstance(d, OutputScaleDelta) and not d.with_bias
    return _row(k=1, no_bias=int(no_bias), vec_b=d.shift.data_ptr())


def _scale(
    y: torch.Tensor, src: torch.Tensor, batch: AdapterBatch, slots: SlotList, bias: torch.Tensor | None
) -> None:
    plan = kernel_plan(batch)
    table = slot_table(slots, _scale_row, y.device)
    if not plan.num_tiles:
        return
    src = _rows(src)
    block_n = _block(y.shape[1], 16, 128)
    k.scale_kernel[(plan.num_tiles, triton.cdiv(y.shape[1], block_n))](
        y, src, bias if bias is not None else y, plan.tokens, plan.tiles, plan.groups, plan.pairs,
        plan.weights, table, plan.num_tiles, plan.num_groups, y.shape[1], y.stride(0), src.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=plan.block_m, BLOCK_N=block_n,
    )  # fmt: skip


def input_scale_triton(
    xs: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[InputScaleDelta | None]
) -> None:
    """Semantics: as input_scale_reference. One launch."""
    _scale(xs, x, batch, slots, None)


def output_scale_triton(
    y: torch.Tensor,
    y0: torch.Tensor,
    batch: AdapterBatch,
    slots: Sequence[OutputScaleDelta | None],
    bias: torch.Tensor | None,
) -> None:
    """Semantics: as output_scale_reference. One launch; y0 is read before y is written (it may be y)."""
    _scale(y, y0, batch, slots, bias)


CAPTURABLE: dict[
    type[Form], Callable[[Form], tuple[SlotList, Callable[[object, list[torch.Tensor]], Row]]]
] = {
    LowRankForm: lambda f: (f.slots, _low_rank_row),
    ProjectedForm: lambda f: (f.projected, _projected_row),
    DenseForm: lambda f: (f.slots, _dense_row),
    KroneckerForm: lambda f: (f.slots, _kron_row),
    SparseForm: lambda f: (f.slots, lambda d, keep: _sparse_row(d, keep, f.spec.out_features)),
}
"""The forms a captured CUDA graph can run (the ADD ones: launches fixed by the plan's capacity alone),
each with the slots and row builder of its table."""


def refresh_tables(forms: Iterable[Form], device: torch.device) -> None:
    """Bring these forms' slot tables up to date before a graph replay (no Python runs inside one)."""
    for form in forms:
        slots, row = CAPTURABLE[type(form)](form)
        slot_table(slots, row, device)
