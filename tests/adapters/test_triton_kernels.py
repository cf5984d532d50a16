"""The Triton kernels of every form against the torch reference (on CPU under Triton's interpreter).

Small hidden sizes keep the interpreter quick; sizes are chosen not to be multiples of the block sizes.
"""

from __future__ import annotations

import math

import pytest
import torch

from peftserve.adapters import AdapterBatch
from peftserve.adapters.forms import Form, LayerSpec, LowRankDelta, LowRankForm, SharedTensors
from peftserve.adapters.kernels import select_kernels
from tests.adapters.test_kernels import BIAS, CASES, SLOTS, SPAN_CASES, Case, InputScaleForm, T
from tests.helpers.devices import KERNEL_DEVICE

pytest.importorskip("triton")
pytestmark = pytest.mark.triton

DEVICE = KERNEL_DEVICE
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
"""Relative to the largest delta: one rounding of the output vs the reference's several."""


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make(case: Case, kernels: str, dtype: torch.dtype = torch.float32) -> Form:
    """test_kernels' form with its deltas on the kernels' device, in `dtype`."""
    spec = LayerSpec(24, 40, SLOTS, BIAS.to(DEVICE, dtype), kernels, SharedTensors())
    form = case.form(spec)
    gen = _gen(0)
    for slot in range(SLOTS - 1):
        form.load(slot, case.make(slot, gen).to(DEVICE, dtype))
    return form


def _apply(form, spans, y: torch.Tensor, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    y = y.clone()
    batch = AdapterBatch.build(spans, num_tokens, y.device)
    form.apply(y, y if form.stage.value == "output" else x, batch)
    return y


def _untouched(spans, num_tokens: int, holding: set[int]) -> torch.Tensor:
    """[T] rows no slot holding a delta updates."""
    rows = torch.ones(num_tokens, dtype=torch.bool)
    for start, length, pairs in spans:
        if any(s in holding for s, _ in pairs):
            rows[start : start + length] = False
    return rows


@pytest.mark.parametrize("spans_name", list(SPAN_CASES))
@pytest.mark.parametrize("name", list(CASES))
def test_every_form_equals_reference(name: str, spans_name: str) -> None:
    """fp32, every span layout of test_kernels (mixtures, scattered groups, decode rows, empty slots)."""
    case, spans = CASES[name], SPAN_CASES[spans_name]
    x = torch.randn(T, 24, generator=_gen(1)).to(DEVICE)  # [T, in]
    width = 24 if case.form is InputScaleForm else 40
    base = torch.randn(T, width, generator=_gen(2)).to(DEVICE)  # [T, out]
    ref_form, fast_form = _make(case, "reference"), _make(case, "triton")
    target = x if case.form is InputScaleForm else base
    expected = _apply(ref_form, spans, target, x, T)
    got = _apply(fast_form, spans, target, x, T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    untouched = _untouched(spans, T, set(range(SLOTS - 1))).to(DEVICE)
    assert torch.equal(got[untouched], target[untouched])  # rows of no delta here: bitwise untouched


RANKS = (1, 3, 16, 17, 64, 200, 256, 5)
IN, OUT = 40, 72  # not multiples of 16 nor of 64


def _low_rank_form(kernels: str, dtype: torch.dtype, device: str = DEVICE) -> LowRankForm:
    """A layer of len(RANKS) + 1 slots: slot i at rank RANKS[i], the last slot without a delta here."""
    form = LowRankForm(LayerSpec(IN, OUT, len(RANKS) + 1, None, kernels, SharedTensors()))
    gen = _gen(5)
    for slot, r in enumerate(RANKS):
        a = torch.randn(r, IN, generator=gen) / math.sqrt(IN)
        b = torch.randn(OUT, r, generator=gen) / math.sqrt(r)
        form.load(slot, LowRankDelta(a=a, b=b).to(device, dtype))
    return form


def _check(got: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, base: torch.Tensor) -> None:
    delta = (expected.double() - base.double()).abs().max().item()
    tol = TOLERANCE[dtype] * max(delta, 1.0)
    torch.testing.assert_close(got.double(), expected.double(), rtol=0, atol=tol)


MIXED_STEP = [
    (0, 1, ((0, 1.0),)),  # rank 1, one token
    (1, 7, ((6, 1.0),)),  # rank 256
    (8, 1, ((5, 1.0),)),  # rank 200, a decode row
    (9, 3, ((1, 0.5), (4, -1.25), (8, 2.0))),  # mixture of ranks 3 and 64 and the empty slot
    (12, 2, ((8, 1.0),)),  # only the empty slot: a group with nothing to add, never written
    (14, 19, ((2, 1.0),)),  # rank 16, more rows than a 16-row tile
    (33, 4, ((3, 1.0),)),  # rank 17
    (40, 5, ((6, 1.0),)),  # rank 256 again: the same group as tokens 1-7
    (45, 3, ((7, 0.75),)),  # rank 5, a weight of its own
    (48, 2, ((1, 0.5), (4, -1.25), (8, 2.0))),  # the same mixture again
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_rank_mixed_ranks_in_one_step(dtype: torch.dtype) -> None:
    """Ranks 1-256 in one step, mixtures, a group of no delta, 1-19-token groups; fp32, bf16, fp16."""
    num_tokens = 53  # tokens 50-52 use no adapter
    x = torch.randn(num_tokens, IN, generator=_gen(6)).to(DEVICE, dtype)
    y = torch.randn(num_tokens, OUT, generator=_gen(7)).to(DEVICE, dtype)
    expected = _apply(_low_rank_form("reference", dtype), MIXED_STEP, y, x, num_tokens)
    got = _apply(_low_rank_form("triton", dtype), MIXED_STEP, y, x, num_tokens)
    _check(got, expected, dtype, y)
    untouched = _untouched(MIXED_STEP, num_tokens, set(range(len(RANKS)))).to(DEVICE)
    assert untouched[12:14].all() and untouched[50:].all()
    assert torch.equal(got[untouched], y[untouched])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_rank_one_token_and_a_long_prefill(dtype: torch.dtype) -> None:
    """A single decode token, and one step of 1,030 prefill tokens over three adapters and a mixture."""
    prefill = [(0, 700, ((6, 1.0),)), (700, 1, ((0, 1.0),)), (701, 300, ((2, 0.5), (5, 0.5)))]
    for spans, num_tokens in (([(0, 1, ((4, 1.0),))], 1), ([*prefill, (1001, 29, ((3, 1.0),))], 1030)):
        x = torch.randn(num_tokens, IN, generator=_gen(8)).to(DEVICE, dtype)
        y = torch.randn(num_tokens, OUT, generator=_gen(9)).to(DEVICE, dtype)
        expected = _apply(_low_rank_form("reference", dtype), spans, y, x, num_tokens)
        got = _apply(_low_rank_form("triton", dtype), spans, y, x, num_tokens)
        _check(got, expected, dtype, y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["sparse", "dense", "kronecker", "projected", "output_scale", "input_scale"])
def test_other_forms_in_half_precision(name: str, dtype: torch.dtype) -> None:
    case, spans = CASES[name], SPAN_CASES["mixtures"]
    x = torch.randn(T, 24, generator=_gen(1)).to(DEVICE, dtype)
    width = 24 if case.form is InputScaleForm else 40
    target = torch.randn(T, width, generator=_gen(2)).to(DEVICE, dtype)
    forms = [_make(case, kernels, dtype) for kernels in ("reference", "triton")]
    expected, got = (_apply(form, spans, target, x, T) for form in forms)
    _check(got, expected, dtype, target)


class _Counting:
    """Stands for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel) -> None:
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.mark.parametrize("distinct", [1, 8])
def test_launches_do_not_grow_with_adapters(distinct: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from peftserve.adapters.triton import kernels

    counters = {name: _Counting(getattr(kernels, name)) for name in ("shrink_kernel", "expand_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(kernels, name, counter)
    spans = [(t, 1, ((t % distinct, 1.0),)) for t in range(16)]  # 16 decode rows over `distinct` adapters
    x = torch.randn(16, IN, generator=_gen(3)).to(DEVICE)
    y = torch.zeros(16, OUT, device=DEVICE)
    _apply(_low_rank_form("triton", torch.float32), spans, y, x, 16)
    assert [c.launches for c in counters.values()] == [1, 1]


def test_a_row_depends_only_on_itself() -> None:
    """NaN in every other row of the input leaves a row's output bitwise the same (tiles mix no rows)."""
    spans = [(0, 20, ((2, 1.0),)), (20, 20, ((2, 1.0), (6, 0.5)))]
    x = torch.randn(40, IN, generator=_gen(4)).to(DEVICE)
    y = torch.randn(40, OUT, generator=_gen(5)).to(DEVICE)
    form = _low_rank_form("triton", torch.float32)
    clean = _apply(form, spans, y, x, 40)
    for row in (0, 7, 25):
        poisoned = torch.full_like(x, float("nan"))
        poisoned[row] = x[row]
        assert torch.equal(_apply(form, spans, y, poisoned, 40)[row], clean[row])
    assert torch.equal(_apply(form, spans, y, x, 40), clean)  # deterministic: no atomics


def test_slot_table_follows_loads_and_clears() -> None:
    spans = [(0, 4, ((0, 1.0),))]
    x = torch.randn(4, IN, generator=_gen(6)).to(DEVICE)
    y = torch.zeros(4, OUT, device=DEVICE)
    form = _low_rank_form("triton", torch.float32)
    before = _apply(form, spans, y, x, 4)
    replacement = LowRankDelta(a=torch.ones(2, IN), b=torch.ones(OUT, 2)).to(DEVICE, torch.float32)
    form.load(0, replacement)
    after = _apply(form, spans, y, x, 4)
    torch.testing.assert_close(after, (x @ replacement.a.T) @ replacement.b.T)
    assert not torch.equal(before, after)
    form.clear(0)
    assert torch.equal(_apply(form, spans, y, x, 4), y)


def test_cuda_selects_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    assert select_kernels("cuda") == "triton" and select_kernels("cpu") == "compiled"
    monkeypatch.setattr("peftserve.adapters.kernels.triton_available", lambda: False)
    assert select_kernels("cuda") == "grouped"
