"""Fast kernels vs the torch reference, and the reference vs a per-token formula, on random data."""

from __future__ import annotations

import pytest
import torch

from peftserve.adapters import AdapterBatch, LoraDelta, SparseDelta
from peftserve.adapters.kernels import GROUPED, REFERENCE, select_kernels

IN, OUT, T = 24, 40, 30


def _lora_slots(ranks: list[int | None], seed: int = 0) -> list[LoraDelta | None]:
    gen = torch.Generator().manual_seed(seed)
    return [
        None
        if r is None
        else LoraDelta(a=torch.randn(r, IN, generator=gen), b=torch.randn(OUT, r, generator=gen))
        for r in ranks
    ]


def _sparse_slots(sizes: list[int | None], seed: int = 0) -> list[SparseDelta | None]:
    gen = torch.Generator().manual_seed(seed)
    return [
        None
        if k is None
        else SparseDelta(
            rows=torch.randint(0, OUT, (k,), generator=gen),  # duplicates allowed: they accumulate
            cols=torch.randint(0, IN, (k,), generator=gen),
            values=torch.randn(k, generator=gen),
        )
        for k in sizes
    ]


def _per_token(x: torch.Tensor, spans, delta_of) -> torch.Tensor:
    """y[t] = sum w * x[t] @ dW[s].T, token by token (the definition the kernels must meet)."""
    y = torch.zeros(x.shape[0], OUT, dtype=torch.float64)
    for start, length, pairs in spans:
        for t in range(start, start + length):
            for slot, w in pairs:
                dw = delta_of(slot)
                if dw is not None:
                    y[t] += w * (x[t].double() @ dw.double().T)
    return y


SPAN_CASES = {
    "empty": [],
    "one-slot-all-tokens": [(0, T, ((2, 1.0),))],
    "mixed-ranks-contiguous": [
        (0, 5, ((0, 1.0),)),
        (5, 1, ((1, 1.0),)),
        (9, 8, ((2, 1.0),)),
        (20, 3, ((3, 1.0),)),
    ],
    "same-slot-scattered": [
        (0, 4, ((1, 1.0),)),
        (4, 3, ((0, 1.0),)),
        (10, 2, ((1, 1.0),)),
        (29, 1, ((1, 1.0),)),
    ],
    "mixtures": [
        (0, 6, ((0, 0.5), (1, -1.5))),
        (6, 6, ((1, 1.0),)),
        (12, 1, ((2, 0.25), (3, 0.25), (0, 2.0))),
        (20, 10, ((0, 0.5),)),
    ],
    "decode-like": [(t, 1, ((t % 4, 1.0),)) for t in range(0, T, 2)],
    "slot-without-module": [(0, 10, ((4, 1.0),)), (10, 10, ((0, 1.0), (4, 3.0)))],
}


@pytest.mark.parametrize("case", list(SPAN_CASES))
def test_lora_grouped_equals_reference(case: str) -> None:
    spans = SPAN_CASES[case]
    slots = _lora_slots([4, 1, 16, 7, None])
    x = torch.randn(T, IN)  # [T, in]
    base = torch.randn(T, OUT)  # [T, out]
    batch = AdapterBatch.build(spans, T, "cpu")
    y_ref, y_fast = base.clone(), base.clone()
    REFERENCE.lora(y_ref, x, batch, slots)
    GROUPED.lora(y_fast, x, batch, slots)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    expected = base.double() + _per_token(
        x, spans, lambda s: None if slots[s] is None else slots[s].b @ slots[s].a
    )
    torch.testing.assert_close(y_ref.double(), expected, rtol=1e-5, atol=1e-4)
    untouched = torch.ones(T, dtype=torch.bool)
    for start, length, _ in spans:
        untouched[start : start + length] = False
    assert torch.equal(y_fast[untouched], base[untouched])  # no-adapter rows are bitwise the base


@pytest.mark.parametrize("case", list(SPAN_CASES))
def test_sparse_grouped_equals_reference(case: str) -> None:
    spans = SPAN_CASES[case]
    slots = _sparse_slots([50, 3, 200, 17, None])
    x = torch.randn(T, IN)
    base = torch.randn(T, OUT)
    batch = AdapterBatch.build(spans, T, "cpu")
    y_ref, y_fast = base.clone(), base.clone()
    REFERENCE.sparse(y_ref, x, batch, slots)
    GROUPED.sparse(y_fast, x, batch, slots)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)

    def dense(slot: int) -> torch.Tensor | None:
        d = slots[slot]
        if d is None:
            return None
        return torch.zeros(OUT, IN).index_put_((d.rows, d.cols), d.values, accumulate=True)

    torch.testing.assert_close(
        y_ref.double(), base.double() + _per_token(x, spans, dense), rtol=1e-5, atol=1e-4
    )


def test_batch_groups_once_per_slot() -> None:
    batch = AdapterBatch.build(SPAN_CASES["same-slot-scattered"], T, "cpu")
    by_slot = {g.slot: g for g in batch.groups}
    assert set(by_slot) == {0, 1} and batch.slots == frozenset({0, 1})
    assert by_slot[0].index is None and (by_slot[0].start, by_slot[0].stop) == (4, 7)  # a slice, no gather
    assert by_slot[1].index is not None and by_slot[1].index.tolist() == [0, 1, 2, 3, 10, 11, 29]
    mixed = AdapterBatch.build(SPAN_CASES["mixtures"], T, "cpu")
    slot0 = next(g for g in mixed.groups if g.slot == 0)
    assert slot0.weight is not None and slot0.weight.flatten().tolist() == [0.5] * 6 + [2.0] + [0.5] * 10
    assert AdapterBatch.build([], 0, "cpu").empty


@pytest.mark.parametrize(
    "spans",
    [
        [(0, 5, ((0, 1.0),)), (4, 2, ((1, 1.0),))],  # overlap
        [(28, 5, ((0, 1.0),))],  # past the end
        [(0, 2, ((0, 1.0), (0, 0.5)))],  # slot twice in one sequence
        [(0, 2, ((0, float("nan")),))],
    ],
)
def test_batch_rejects_bad_spans(spans) -> None:
    with pytest.raises(ValueError):
        AdapterBatch.build(spans, T, "cpu")


def test_kernels_selected_per_device() -> None:
    assert select_kernels("cpu") is GROUPED
    assert select_kernels(torch.device("meta")) is REFERENCE


@pytest.mark.parametrize("case", ["one-slot-all-tokens", "mixtures"])
def test_sparse_grouped_in_chunks(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peftserve.adapters.sparse.kernels.GATHER_BUDGET", 100)  # chunks of 1-2 tokens
    spans = SPAN_CASES[case]
    slots = _sparse_slots([50, 3, 200, 17, None])
    x, base = torch.randn(T, IN), torch.randn(T, OUT)
    batch = AdapterBatch.build(spans, T, "cpu")
    y_ref, y_fast = base.clone(), base.clone()
    REFERENCE.sparse(y_ref, x, batch, slots)
    GROUPED.sparse(y_fast, x, batch, slots)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
