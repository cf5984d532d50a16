"""Every form's fast kernel vs its torch reference, and the reference vs a per-token formula (float64)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

from peftserve.adapters import AdapterBatch
from peftserve.adapters.forms import (
    DenseDelta,
    DenseForm,
    Form,
    InputScaleDelta,
    InputScaleForm,
    KroneckerDelta,
    KroneckerForm,
    LayerSpec,
    LowRankDelta,
    LowRankForm,
    OutputScaleDelta,
    OutputScaleForm,
    ProjectedDelta,
    ProjectedForm,
    SharedTensors,
    SparseDelta,
    SparseForm,
)
from peftserve.adapters.kernels import select_kernels
from peftserve.adapters.kinds import FORMS

IN, OUT, T = 24, 40, 30  # IN = 4 * 6, OUT = 5 * 8 for Kronecker factors
SLOTS = 5  # slot 4 holds nothing in this layer


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@dataclass(frozen=True)
class Case:
    """How to make random deltas of one form and what each means per token (the definition)."""

    form: type[Form]
    make: Callable[[int, torch.Generator], object]
    """slot -> a delta"""
    per_token: Callable[[object, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
    """(delta, x [in], base output y0 [out], bias) -> what the slot adds to this token at weight 1
    (INPUT forms: what it adds to the base layer's input [in])."""


BIAS = torch.randn(OUT, generator=_gen(99))
PROJ_A, PROJ_B = torch.randn(6, IN + 3, generator=_gen(7)), torch.randn(OUT + 5, 6, generator=_gen(8))

CASES = {
    "low_rank": Case(
        LowRankForm,
        lambda s, g: LowRankDelta(
            a=torch.randn((4, 1, 16, 7)[s], IN, generator=g),
            b=torch.randn(OUT, (4, 1, 16, 7)[s], generator=g),
        ),
        lambda d, x, y0, bias: d.b.double() @ (d.a.double() @ x),
    ),
    "sparse": Case(
        SparseForm,
        lambda s, g: SparseDelta(
            rows=torch.randint(0, OUT, ((50, 3, 200, 17)[s],), generator=g),  # duplicates accumulate
            cols=torch.randint(0, IN, ((50, 3, 200, 17)[s],), generator=g),
            values=torch.randn((50, 3, 200, 17)[s], generator=g),
        ),
        lambda d, x, y0, bias: (
            torch.zeros(OUT, IN, dtype=torch.float64).index_put_(
                (d.rows, d.cols), d.values.double(), accumulate=True
            )
            @ x
        ),
    ),
    "dense": Case(
        DenseForm,
        lambda s, g: DenseDelta(weight=torch.randn(OUT, IN, generator=g), origin="test"),
        lambda d, x, y0, bias: d.weight.double() @ x,
    ),
    "kronecker": Case(
        KroneckerForm,
        lambda s, g: KroneckerDelta(
            w1=torch.randn(((5, 4), (8, 6), (5, 6), (8, 4))[s], generator=g),
            w2=torch.randn(((8, 6), (5, 4), (8, 4), (5, 6))[s], generator=g),
        ),
        lambda d, x, y0, bias: torch.kron(d.w1.double(), d.w2.double()) @ x,
    ),
    "projected": Case(
        ProjectedForm,
        lambda s, g: ProjectedDelta(
            lambda_d=torch.randn(6, generator=g),
            lambda_b=torch.randn(OUT, generator=g),
            vera_a=PROJ_A if s != 2 else PROJ_A * 2,  # slot 2 has projections of its own
            vera_b=PROJ_B,
            key="shared" if s != 2 else "other",
        ),
        lambda d, x, y0, bias: (
            d.lambda_b.double()
            * (PROJ_B[:OUT].double() @ (d.lambda_d.double() * (d.vera_a[:, :IN].double() @ x)))
        ),
    ),
    "output_scale": Case(
        OutputScaleForm,
        lambda s, g: OutputScaleDelta(shift=torch.randn(OUT, generator=g), with_bias=s % 2 == 0),
        lambda d, x, y0, bias: d.shift.double() * (y0 if d.with_bias else y0 - bias.double()),
    ),
    "input_scale": Case(
        InputScaleForm,
        lambda s, g: InputScaleDelta(shift=torch.randn(IN, generator=g)),
        lambda d, x, y0, bias: d.shift.double() * x,
    ),
}

SPAN_CASES = {
    "empty": [],
    "one-slot-all-tokens": [(0, T, ((2, 1.0),))],
    "contiguous-per-slot": [
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
    "decode-weighted": [(t, 1, ((t % SLOTS, 0.5 if t % 3 else 1.0),)) for t in range(T)],
    "decode-and-prefill": [(0, 9, ((1, 1.0),)), *((t, 1, ((t % 4, 1.0),)) for t in range(9, T))],
    "slot-without-module": [(0, 10, ((4, 1.0),)), (10, 10, ((0, 1.0), (4, 3.0)))],
}


def make_form(case: Case, kernels: str, seed: int = 0) -> Form:
    form = case.form(LayerSpec(IN, OUT, SLOTS, BIAS, kernels, SharedTensors()))
    gen = _gen(seed)
    for slot in range(SLOTS - 1):
        form.load(slot, case.make(slot, gen).to("cpu", torch.float32))
    return form


def run(form: Form, spans, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    batch = AdapterBatch.build(spans, T, "cpu")
    if case_stage_input(form):
        y = x.clone()
        form.apply(y, x, batch)
    elif form.stage.value == "output":
        y = base.clone()
        form.apply(y, y, batch)  # the layer passes y itself as the base output when it can
    else:
        y = base.clone()
        form.apply(y, x, batch)
    return y


def case_stage_input(form: Form) -> bool:
    return form.stage.value == "input"


def expected(case: Case, form: Form, spans, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The per-token definition in float64: base (or x for INPUT forms) plus each slot's weighted term."""
    out = (x if case_stage_input(form) else base).double().clone()
    for start, length, pairs in spans:
        for t in range(start, start + length):
            for slot, w in pairs:
                d = form.slots[slot]
                if d is not None:
                    out[t] += w * case.per_token(d, x[t].double(), base[t].double(), BIAS)
    return out


def test_every_registered_form_is_tested() -> None:
    assert set(FORMS) == {case.form for case in CASES.values()}


@pytest.mark.parametrize("spans_name", list(SPAN_CASES))
@pytest.mark.parametrize(
    ("name", "kernels"),
    [(n, k) for n, c in CASES.items() for k in ("grouped", "parallel", "compiled") if k in c.form.kernels],
)
def test_fast_equals_reference_equals_definition(name: str, spans_name: str, kernels: str) -> None:
    """Every CPU kernel a form has of its own (grouped; parallel and compiled where it has them)."""
    case, spans = CASES[name], SPAN_CASES[spans_name]
    width = IN if case.form is InputScaleForm else OUT
    x = torch.randn(T, IN, generator=_gen(1))  # [T, in]
    base = torch.randn(T, width, generator=_gen(2))  # [T, out]
    y_ref = run(make_form(case, "reference"), spans, x, base)
    form = make_form(case, kernels)
    y_fast = run(form, spans, x, base)
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_ref.double(), expected(case, form, spans, x, base), rtol=1e-5, atol=1e-4)
    untouched = torch.ones(T, dtype=torch.bool)
    for start, length, pairs in spans:
        if any(s < SLOTS - 1 for s, _ in pairs):
            untouched[start : start + length] = False
    reference = x if case.form is InputScaleForm else base
    assert torch.equal(y_fast[untouched], reference[untouched])  # rows of no slot here: bitwise untouched


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


def test_a_form_without_a_kernel_runs_what_it_falls_back_to() -> None:
    dense = make_form(CASES["dense"], "compiled")  # compiled -> parallel -> grouped
    assert dense.kernel is DenseForm.kernels["grouped"]
    assert make_form(CASES["low_rank"], "compiled").kernel is LowRankForm.kernels["compiled"]


def test_kernels_selected_per_device() -> None:
    assert select_kernels("cpu") == "compiled"
    assert select_kernels(torch.device("meta")) == "reference"


@pytest.mark.parametrize("spans_name", ["one-slot-all-tokens", "mixtures"])
def test_sparse_grouped_in_chunks(spans_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peftserve.adapters.forms.sparse.GATHER_BUDGET", 100)  # chunks of 1-2 tokens
    case, spans = CASES["sparse"], SPAN_CASES[spans_name]
    x, base = torch.randn(T, IN, generator=_gen(3)), torch.randn(T, OUT, generator=_gen(4))
    torch.testing.assert_close(
        run(make_form(case, "grouped"), spans, x, base),
        run(make_form(case, "reference"), spans, x, base),
        rtol=1e-5,
        atol=1e-5,
    )


def test_shared_projections_are_held_once_and_released() -> None:
    form = make_form(CASES["projected"], "grouped")
    shared = form.spec.shared
    assert len(shared) == 4  # A and B of two distinct projections, whatever the number of slots
    for slot in range(SLOTS - 1):
        form.clear(slot)
    assert len(shared) == 0 and shared.nbytes == 0
