"""The CPU kernels' thread shares (workers.py), and the parallel low-rank kernel against the reference at
sizes the small cases of test_kernels.py do not reach: 1 and 1,000+ tokens, fp32 and bf16, 1-3 shares."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from peftserve.adapters import AdapterBatch
from peftserve.adapters.forms import LayerSpec, LowRankDelta, LowRankForm, SharedTensors
from peftserve.adapters.workers import Workers, one_intra_op_thread, split_by_cost, workers

IN, OUT = 64, 96
RANKS = (4, 16, 1, 32, 8, 0, 16, 2)
"""Per slot; slot 5 holds nothing in this layer (rank 0: an empty group)."""


@pytest.mark.parametrize(
    ("costs", "parts", "runs"),
    [
        ([], 2, []),
        ([5.0], 2, [(0, 1)]),
        ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
        ([10, 1, 1], 2, [(0, 1), (1, 3)]),
        ([1, 1, 10], 2, [(0, 2), (2, 3)]),  # the last item never leaves a run empty
        ([1] * 9, 3, [(0, 3), (3, 6), (6, 9)]),
        ([1, 1], 5, [(0, 1), (1, 2)]),
        ([3, 3, 3], 1, [(0, 3)]),
    ],
)
def test_split_by_cost(costs: list[float], parts: int, runs: list[tuple[int, int]]) -> None:
    got = split_by_cost(costs, parts)
    assert [(r.start, r.stop) for r in got] == runs


def test_workers_run_every_share_with_one_intra_op_thread() -> None:
    pool = Workers(3)
    seen: list[tuple[int, int, str]] = []
    lock = threading.Lock()

    def fn(share: int) -> None:
        with lock:
            seen.append((share, torch.get_num_threads(), threading.current_thread().name))

    before = torch.get_num_threads()
    pool.run(fn, [0, 1, 2])
    pool.close()
    assert sorted(s for s, _, _ in seen) == [0, 1, 2]
    assert all(n == 1 for _, n, _ in seen)
    assert torch.get_num_threads() == before  # the caller's setting is restored
    assert next(name for s, _, name in seen if s == 2) == threading.current_thread().name


def test_helpers_keep_one_thread_and_threads_started_later_get_the_processs_count() -> None:
    """The helpers' one intra-op thread is their own: a thread started after them (an engine's, a
    warm-up's) runs with the count the process had, and the helpers keep 1 after the caller changes it."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pool = Workers(2)
        later: list[int] = []
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
        torch.set_num_threads(2)  # as an engine made later sets its count (EngineConfig.threads)
        counts: list[int] = []
        pool.run(lambda share: counts.append(torch.get_num_threads()), [0, 1])
        pool.close()
        assert counts == [1, 1]
    finally:
        torch.set_num_threads(before)


def test_workers_wait_for_every_share_and_raise_a_helpers_error() -> None:
    pool = Workers(2)
    done = []

    def fn(share: int) -> None:
        if share == 0:
            raise ValueError("helper failed")
        done.append(share)

    with pytest.raises(ValueError, match="helper failed"):
        pool.run(fn, [0, 1])
    assert done == [1]
    pool.close()


def _form(kernels: str, dtype: torch.dtype, size: tuple[int, int] = (IN, OUT)) -> LowRankForm:
    d_in, d_out = size
    form = LowRankForm(LayerSpec(d_in, d_out, len(RANKS), None, kernels, SharedTensors()))
    gen = torch.Generator().manual_seed(0)
    for slot, r in enumerate(RANKS):
        if r:
            a, b = torch.randn(r, d_in, generator=gen), torch.randn(d_out, r, generator=gen)
            form.load(slot, LowRankDelta(a=a, b=b).to("cpu", dtype))
    return form


def _spans(num_tokens: int, per_seq: int, mixtures: bool) -> list:
    """Sequences of `per_seq` tokens cycling over the slots (scattered groups), some without adapter."""
    spans = []
    for i, start in enumerate(range(0, num_tokens, per_seq)):
        length = min(per_seq, num_tokens - start)
        if i % 7 == 6:
            continue  # a base-model sequence
        pairs = ((i % len(RANKS), 1.0),)
        if mixtures and i % 5 == 0:
            pairs = ((i % len(RANKS), 0.5), ((i + 3) % len(RANKS), -2.0))
        spans.append((start, length, pairs))
    return spans


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("num_tokens", "per_seq", "mixtures"),
    [(1, 1, False), (64, 1, False), (1200, 37, False), (1200, 1, False), (300, 13, True)],
    ids=["1-token", "decode-64", "prefill-1200", "decode-1200", "mixtures"],
)
def test_parallel_low_rank_equals_reference(
    size: int, dtype: torch.dtype, num_tokens: int, per_seq: int, mixtures: bool, monkeypatch
) -> None:
    monkeypatch.setattr("peftserve.adapters.forms.low_rank.workers", lambda: workers(size))
    spans = _spans(num_tokens, per_seq, mixtures)
    batch = AdapterBatch.build(spans, num_tokens, "cpu")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, IN, generator=gen).to(dtype)  # [T, in]
    y0 = torch.randn(num_tokens, OUT, generator=gen).to(dtype)  # [T, out]
    y_ref, y_par = y0.clone(), y0.clone()
    _form("reference", dtype).apply(y_ref, x, batch)
    _form("parallel", dtype).apply(y_par, x, batch)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y_par.float(), y_ref.float(), rtol=tol, atol=tol * 10)
    untouched = torch.ones(num_tokens, dtype=torch.bool)
    for start, length, pairs in spans:
        if any(RANKS[s] for s, _ in pairs):
            untouched[start : start + length] = False
    assert torch.equal(y_par[untouched], y0[untouched])


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_helpers_run_in_the_callers_mode(mode: str) -> None:
    pool = Workers(2)
    seen: dict[int, tuple[bool, bool]] = {}

    def fn(share: int) -> None:
        seen[share] = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())

    with torch.inference_mode() if mode == "inference" else torch.no_grad():
        pool.run(fn, [0, 1])
        expected = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
    pool.close()
    assert seen == {0: expected, 1: expected}


def test_parallel_low_rank_updates_inference_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine runs the model under inference mode: the helpers write into its inference tensors."""
    monkeypatch.setattr("peftserve.adapters.forms.low_rank.workers", lambda: workers(2))
    spans = _spans(64, 1, mixtures=False)
    batch = AdapterBatch.build(spans, 64, "cpu")
    with torch.inference_mode():
        x, y = torch.randn(64, IN), torch.zeros(64, OUT)  # [T, in], [T, out]
        y_ref = y.clone()
        _form("reference", torch.float32).apply(y_ref, x, batch)
        _form("parallel", torch.float32).apply(y, x, batch)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("kernels", "held"),
    [("parallel", torch.float32), ("grouped", torch.float32), ("reference", torch.bfloat16)],
)
def test_cpu_kernels_hold_a_bfloat16_models_factors_in_float32(kernels: str, held: torch.dtype) -> None:
    """torch's CPU matrix-vector products are slow in bfloat16: the fast CPU kernels keep float32 factors."""
    form = _form(kernels, torch.bfloat16)
    loaded = [d for d in form.slots if d is not None]
    assert loaded and all(d.a.dtype == d.b.dtype == held for d in loaded)


def test_parallel_low_rank_gives_the_bits_of_one_thread(monkeypatch) -> None:
    """Shared out or not (one group, or a mixture in the step), every product runs on one thread, so a
    row's bits do not depend on which other rows share its step (engine outputs equal requests alone)."""
    monkeypatch.setattr("peftserve.adapters.forms.low_rank.workers", lambda: workers(2))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # what the grouped kernel would otherwise run its products with
    try:
        _compare_random_steps()
    finally:
        torch.set_num_threads(threads)


def _compare_random_steps() -> None:
    d_in, d_out, slots = 256, 512, 8
    gen = torch.Generator().manual_seed(3)
    forms = {
        k: LowRankForm(LayerSpec(d_in, d_out, slots, None, k, SharedTensors()))
        for k in ("grouped", "parallel")
    }
    for slot in range(slots):
        delta = LowRankDelta(a=torch.randn(8, d_in, generator=gen), b=torch.randn(d_out, 8, generator=gen))
        for form in forms.values():
            form.load(slot, delta)
    rng = random.Random(0)
    for _ in range(200):  # random steps: 1-12 sequences of 1, 5 or 17 tokens, one in ten a mixture
        spans, t = [], 0
        for _ in range(rng.randint(1, 12)):
            length, first, second = rng.choice([1, 1, 1, 5, 17]), rng.randrange(slots), rng.randrange(slots)
            mixed = rng.random() < 0.1 and first != second
            spans.append((t, length, ((first, 0.5), (second, 0.25)) if mixed else ((first, 1.0),)))
            t += length
        batch = AdapterBatch.build(spans, t, "cpu")
        x, y_one = (
            torch.randn(t, d_in, generator=gen),
            torch.randn(t, d_out, generator=gen),
        )  # [T, in], [T, out]
        y_par = y_one.clone()
        with one_intra_op_thread():
            forms["grouped"].apply(y_one, x, batch)
        forms["parallel"].apply(y_par, x, batch)
        assert torch.equal(y_par, y_one), spans
