"""The compiled low-rank kernel's storage (factors stacked by rank) and its promises: exact against the
reference in float32 and bfloat16, a row's bits independent of its step, a clean fallback."""

from __future__ import annotations

import random

import pytest
import torch

from peftserve import native
from peftserve.adapters import AdapterBatch
from peftserve.adapters.forms import LayerSpec, LowRankDelta, LowRankForm, SharedTensors, low_rank_rows
from peftserve.adapters.forms.low_rank_rows import bucket_of

D_IN, D_OUT = 96, 160


def _delta(rank: int, gen: torch.Generator, dtype: torch.dtype = torch.float32) -> LowRankDelta:
    a, b = torch.randn(rank, D_IN, generator=gen), torch.randn(D_OUT, rank, generator=gen)
    return LowRankDelta(a=a.to(dtype), b=b.to(dtype))


def _form(kernels: str, slots: int = 8) -> LowRankForm:
    return LowRankForm(LayerSpec(D_IN, D_OUT, slots, None, kernels, SharedTensors()))


def test_ranks_share_power_of_two_buckets() -> None:
    assert [bucket_of(r) for r in (1, 8, 9, 12, 16, 17, 64, 100)] == [8, 8, 16, 16, 16, 32, 64, 128]


def test_slots_are_views_of_the_stacks_and_survive_growth() -> None:
    gen = torch.Generator().manual_seed(0)
    form = _form("compiled")
    stacks = form.stacks
    assert stacks is not None
    originals = {slot: _delta(rank, gen) for slot, rank in enumerate((4, 12, 16, 40, 16, 16, 3))}
    for slot, delta in originals.items():
        form.load(slot, delta)
    assert sorted(stacks.stacks) == [8, 16, 64]
    assert len(stacks.stacks[16].owner) == 4  # three rank 12-16 adapters: grown from 2 to 4
    for slot, delta in originals.items():
        held = form.slots[slot]
        assert torch.equal(held.a, delta.a) and torch.equal(held.b, delta.b)
        bucket, index = stacks.where[slot]
        stack = stacks.stacks[bucket]
        assert held.a.data_ptr() == stack.a[index].data_ptr()  # a view, not a second copy
        assert held.b.data_ptr() == stack.bt[index].data_ptr()
        assert not stack.a[index, delta.rank :].any()  # padded with zeros
    form.clear(1)
    assert 1 not in stacks.where and None in stacks.stacks[16].owner
    form.load(7, originals[1])  # takes the freed index: no growth
    assert len(stacks.stacks[16].owner) == 4 and torch.equal(form.slots[7].a, originals[1].a)
    many = _form("compiled", slots=5)
    for slot in range(5):
        many.load(slot, _delta(16, gen))
    assert len(many.stacks.stacks[16].owner) == 5  # 2, 4, then the layer's 5 slots, not 8
    # float32 (in + out) = 256 per stacked row: bucket 8 holds 2 slots, 16 grew to 4, 64 holds 2
    assert stacks.nbytes == 4 * 256 * (2 * 8 + 4 * 16 + 2 * 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("span_max", [32, low_rank_rows.ROWS_SPAN_MAX], ids=["span-max-32", "span-max"])
def test_compiled_equals_the_definition_on_random_steps(
    dtype: torch.dtype, span_max: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Random steps of decode rows, prefill chunks and mixtures, slots of mixed ranks and a slot without a
    delta: the compiled kernel's output equals the per-token definition in float64 (float32: 1e-4;
    bfloat16: a few roundings of the output), and in float32 the reference kernel's (1e-5). With
    ROWS_SPAN_MAX at 32, _random_spans' 40-token spans take both paths; at its own value, every span of
    one adapter runs as rows."""
    monkeypatch.setattr(low_rank_rows, "ROWS_SPAN_MAX", span_max)
    gen = torch.Generator().manual_seed(1)
    forms = {k: _form(k) for k in ("reference", "compiled")}
    for slot, rank in enumerate((4, 16, 9, 33, 16, 1, 12)):  # slot 7 stays empty
        delta = _delta(rank, gen)
        delta = LowRankDelta(a=(delta.a * 0.1).to(dtype), b=(delta.b * 0.1).to(dtype))
        for form in forms.values():
            form.load(slot, delta)
    rng = random.Random(1)
    for _ in range(30):
        spans, t = _random_spans(rng, slots=8)
        x, y = torch.randn(t, D_IN, generator=gen).to(dtype), torch.randn(t, D_OUT, generator=gen).to(dtype)
        outs = {}
        for name, form in forms.items():
            outs[name] = y.clone()
            form.apply(outs[name], x, AdapterBatch.build(spans, t, "cpu"))
        exact = y.double()
        for start, length, pairs in spans:
            for slot, weight in pairs:
                held = forms["compiled"].slots[slot]
                if held is not None:
                    rows = slice(start, start + length)
                    exact[rows] += weight * (x[rows].double() @ held.a.double().T @ held.b.double().T)
        if dtype == torch.float32:
            torch.testing.assert_close(outs["compiled"], outs["reference"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(outs["compiled"].double(), exact, rtol=1e-5, atol=1e-4)
        else:
            torch.testing.assert_close(outs["compiled"].double(), exact, rtol=2e-2, atol=2e-2)


BF16_DOT = pytest.mark.skipif(not native.bf16_dot, reason="the CPU has no AVX512-BF16")
KERNEL_DTYPES = [
    pytest.param(torch.float32, False, id="float32"),
    pytest.param(torch.bfloat16, False, id="bfloat16-generic"),
    pytest.param(torch.bfloat16, True, id="bfloat16-dot", marks=BF16_DOT),
    pytest.param(torch.float16, False, id="float16"),
]
"""(dtype, bf16_dot): each of the kernel's loops, the bf16 dot-product one where the CPU has it."""


@pytest.mark.parametrize("dtype, bf16_dot", KERNEL_DTYPES)
@pytest.mark.parametrize("width, out", [(1, 1), (37, 70), (100, 33), (64, 128)])
def test_the_rows_kernel_equals_the_definition_at_any_width(
    dtype: torch.dtype, bf16_dot: bool, width: int, out: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Widths that are not multiples of the vector width (its masked tails: 32 values for the bf16
    dot-product loop), ranks from 1 to 256 (buckets 8 to 256) in one layer, runs of 1 to 6 rows of one
    adapter (the kernel's blocks of 1 to 4 rows), weights, and x and y as strided views: each row as the
    definition in float64, within one rounding of y (float32: 1e-5); rows outside the step untouched."""
    monkeypatch.setattr(native, "bf16_dot", bf16_dot)
    gen = torch.Generator().manual_seed(6)
    form = LowRankForm(LayerSpec(width, out, 8, None, "compiled", SharedTensors()))
    ranks = (1, 8, 9, 40, 256, 16)
    for slot, rank in enumerate(ranks):
        a = torch.randn(rank, width, generator=gen) / width**0.5
        b = torch.randn(out, rank, generator=gen) / rank
        form.load(slot, LowRankDelta(a=a.to(dtype), b=b.to(dtype)))
    runs = [(0, 2), (6, 1), (1, 3), (2, 1), (3, 4), (4, 6), (5, 5)]  # (slot, rows): slot 6 holds nothing
    spans, t = [], 0
    for slot, count in runs:
        spans += [(t + i, 1, ((slot, 0.5 if (t + i) % 3 else 1.0),)) for i in range(count)]
        t += count
    t += 1  # a row outside the step
    x = torch.randn(t, 2 * width, generator=gen).to(dtype)[:, ::2]  # rows with a stride of 2
    y = torch.randn(out, t, generator=gen).to(dtype).T  # y's rows not contiguous either
    before = y.clone()
    form.apply(y, x, AdapterBatch.build(spans, t, "cpu"))
    exact = before.double()
    for start, _, ((slot, weight),) in spans:
        held = form.slots[slot]
        if held is not None:
            exact[start] += weight * (x[start].double() @ held.a.double().T @ held.b.double().T)
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.double(), exact, rtol=tolerance, atol=tolerance)
    assert torch.equal(y[t - 1], before[t - 1]) and torch.equal(y[2], before[2])  # outside; slot 6


def test_rows_of_another_dtype_than_the_factors_are_refused() -> None:
    """The kernel reads raw memory: float32 rows over bfloat16 stacks raise instead of reaching it."""
    form = _form("compiled")
    form.load(0, _delta(8, torch.Generator().manual_seed(7), torch.bfloat16))
    y = torch.zeros(1, D_OUT)
    with pytest.raises(TypeError, match="bfloat16"):
        form.apply(y, torch.ones(1, D_IN), AdapterBatch.build([(0, 1, ((0, 1.0),))], 1, "cpu"))
    assert not y.any()


def test_a_rows_bits_do_not_depend_on_its_step() -> None:
    """Each decode row and each token of a prefill span (its neighbours in the kernel's blocks of rows),
    computed in a random step, has the bits it has computed alone."""
    gen = torch.Generator().manual_seed(2)
    form = _form("compiled")
    for slot in range(8):
        form.load(slot, _delta(8 if slot % 2 else 16, gen, torch.bfloat16))
    rng = random.Random(2)
    for _ in range(20):
        spans, t = _random_spans(rng, slots=8)
        x, y = torch.randn(t, D_IN, generator=gen).bfloat16(), torch.randn(t, D_OUT, generator=gen).bfloat16()
        together = y.clone()
        form.apply(together, x, AdapterBatch.build(spans, t, "cpu"))
        alone_batch = {pairs: AdapterBatch.build([(0, 1, pairs)], 1, "cpu") for _, _, pairs in spans}
        for start, length, pairs in spans:
            if len(pairs) > 1:
                continue
            assert length <= low_rank_rows.ROWS_SPAN_MAX  # every token a row
            for token in range(start, start + length):
                alone = y[token : token + 1].clone()
                form.apply(alone, x[token : token + 1], alone_batch[pairs])
                assert torch.equal(alone[0], together[token]), (token, spans)


def test_rows_shared_among_threads_have_the_bits_of_one_thread() -> None:
    """The kernel shares a call's rows among its threads by cost, in runs of one adapter cut or kept
    whole: with 2, 3 or 7 threads every row gets the bits one thread gives it, for runs of every length
    (the other adapter tests run torch on one thread, where the split never runs)."""
    gen = torch.Generator().manual_seed(7)
    stacks = low_rank_rows.RankStacks(6)
    for slot in range(6):
        stacks.put(slot, _delta(16, gen, torch.bfloat16))
    rng = random.Random(7)
    for _ in range(30):
        runs = [(rng.randrange(6), rng.choice([1, 1, 2, 3, 5, 12, 32])) for _ in range(rng.randint(1, 9))]
        spans, t = [], 0
        for slot, length in runs:
            spans += [(t + i, 1, ((slot, 1.0),)) for i in range(length)]
            t += length
        batch = AdapterBatch.build(spans, t, "cpu")
        parts = low_rank_rows.bucket_rows(batch, low_rank_rows.RowsPlan.of(batch), stacks)
        x, y = torch.randn(t, D_IN, generator=gen).bfloat16(), torch.randn(t, D_OUT, generator=gen).bfloat16()
        outs = {}
        for threads in (1, 2, 3, 7):
            torch.set_num_threads(threads)  # the autouse fixture restores the count
            outs[threads] = y.clone()
            low_rank_rows.add_rows(outs[threads], x, parts, stacks)
        assert not torch.equal(outs[1], y)
        for threads in (2, 3, 7):
            assert torch.equal(outs[threads], outs[1]), (threads, runs)


def test_without_a_compiler_the_parallel_kernel_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(dtype: torch.dtype, build: bool = True) -> None:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(low_rank_rows.KERNEL, "get", broken)
    monkeypatch.setattr(low_rank_rows, "unavailable", None)
    low_rank_rows.warm_up(torch.float32)
    assert low_rank_rows.unavailable == "RuntimeError: no C++ compiler"
    gen = torch.Generator().manual_seed(3)
    forms = {k: _form(k) for k in ("reference", "compiled")}
    for slot in range(4):
        delta = _delta(8, gen)
        for form in forms.values():
            form.load(slot, delta)
    spans = [(t, 1, ((t % 4, 1.0),)) for t in range(6)]
    x, y = torch.randn(6, D_IN, generator=gen), torch.randn(6, D_OUT, generator=gen)
    outs = {name: y.clone() for name in forms}
    for name, form in forms.items():
        form.apply(outs[name], x, AdapterBatch.build(spans, 6, "cpu"))
    torch.testing.assert_close(outs["compiled"], outs["reference"], rtol=1e-5, atol=1e-4)


def _random_spans(rng: random.Random, slots: int) -> tuple[list, int]:
    """1-12 sequences of 1 (mostly), 5, 17 or 40 tokens; one in ten a mixture, one in ten weighted."""
    spans, t = [], 0
    for _ in range(rng.randint(1, 12)):
        length, first, second = rng.choice([1, 1, 1, 5, 17, 40]), rng.randrange(slots), rng.randrange(slots)
        draw = rng.random()
        if draw < 0.1 and first != second:
            pairs: tuple = ((first, 0.5), (second, 0.25))
        else:
            pairs = ((first, 0.5 if draw > 0.9 else 1.0),)
        spans.append((t, length, pairs))
        t += length
    return spans, t


def test_layers_placing_slots_alike_share_the_steps_row_lists() -> None:
    """Layers whose stacks hold the same slots at the same places build the step's row lists once; a
    layer that loaded them in another order, or has since cleared one, gets lists of its own."""
    gen = torch.Generator().manual_seed(5)
    deltas = [_delta(16, gen), _delta(16, gen)]
    first, alike, other = _form("compiled"), _form("compiled"), _form("compiled")
    for form, order in ((first, (0, 1)), (alike, (0, 1)), (other, (1, 0))):
        for slot in order:
            form.load(slot, deltas[slot])
    batch = AdapterBatch.build([(0, 1, ((0, 1.0),)), (1, 1, ((1, 1.0),))], 2, "cpu")
    plan = low_rank_rows.RowsPlan.of(batch)
    built = [low_rank_rows.bucket_rows(batch, plan, f.stacks) for f in (first, alike, other)]
    assert built[0] is built[1]
    assert [(p.rows.tolist(), p.index.tolist()) for p in built[0]] == [([0, 1], [0, 1])]
    assert [(p.rows.tolist(), p.index.tolist()) for p in built[2]] == [([1, 0], [0, 1])]  # in stack order
    alike.clear(1)  # no longer placed like `first`: the step must not reuse first's lists
    (part,) = low_rank_rows.bucket_rows(batch, plan, alike.stacks)
    assert part.rows.tolist() == [0] and part.index.tolist() == [0]


def test_long_spans_give_the_gemms_multiples_of_rows_span_max() -> None:
    """A span of one adapter up to ROWS_SPAN_MAX tokens runs as rows; a longer one gives the grouped
    kernel its first multiple of ROWS_SPAN_MAX tokens and runs the rest as rows, so the GEMMs see few
    distinct row counts (oneDNN builds a kernel for each); a mixture goes to the GEMMs whole."""
    m = low_rank_rows.ROWS_SPAN_MAX
    spans = [(0, m, ((0, 1.0),)), (m, 2 * m + 5, ((1, 0.5),)), (3 * m + 5, 2 * m, ((2, 1.0),))]
    spans.append((5 * m + 5, 7, ((0, 0.5), (1, 0.5))))
    batch = AdapterBatch.build(spans, 5 * m + 12, "cpu")
    plan = low_rank_rows.RowsPlan.of(batch)
    assert [token for token, _, _ in plan.rows] == [*range(m), *range(3 * m, 3 * m + 5)]
    assert {(slot, weight) for _, slot, weight in plan.rows if slot == 1} == {(1, 0.5)}
    assert list(plan.rest.spans) == [(m, 2 * m, ((1, 0.5),)), (3 * m + 5, 2 * m, ((2, 1.0),)), spans[3]]
