"""Seeded traces: reproducible, shared across knobs, with the asked-for arrivals and popularity."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import replace

import pytest

from peftserve.bench.config import WorkloadSpec
from peftserve.bench.workload import arrival_times, make_trace, salted

ID_RANGE = (3, 1024)


def test_same_spec_same_trace_and_knobs_leave_the_rest_alone():
    spec = WorkloadSpec(requests=50, num_adapters=10, rate=4.0, prompt_len=(8, 32), output_len=(4, 16))
    trace = make_trace(spec, ID_RANGE)
    assert trace == make_trace(spec, ID_RANGE)

    more_adapters = make_trace(replace(spec, num_adapters=1000), ID_RANGE)
    assert [(r.arrival, r.prompt_ids, r.output_len) for r in more_adapters] == [
        (r.arrival, r.prompt_ids, r.output_len) for r in trace
    ]
    faster = make_trace(replace(spec, rate=40.0), ID_RANGE)
    assert [(r.adapter, r.prompt_ids) for r in faster] == [(r.adapter, r.prompt_ids) for r in trace]
    fewer = make_trace(replace(spec, requests=20), ID_RANGE)
    assert fewer == trace[:20]


def test_lengths_and_ids_stay_in_range():
    spec = WorkloadSpec(requests=200, num_adapters=5, prompt_len=(8, 256), output_len=(8, 256))
    for r in make_trace(spec, ID_RANGE):
        assert 8 <= len(r.prompt_ids) <= 256 and 8 <= r.output_len <= 256
        assert all(ID_RANGE[0] <= t < ID_RANGE[1] for t in r.prompt_ids)
        assert 0 <= r.adapter < 5


@pytest.mark.parametrize("cv", [1.0, 4.0])
def test_gamma_arrivals_have_the_asked_rate_and_burstiness(cv):
    spec = WorkloadSpec(requests=20_000, rate=5.0, cv=cv)
    times = arrival_times(spec)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    mean = sum(gaps) / len(gaps)
    std = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps))
    assert mean == pytest.approx(1 / 5.0, rel=0.1)
    assert std / mean == pytest.approx(cv, rel=0.15)
    assert times[0] == 0.0 and arrival_times(replace(spec, rate=math.inf)) == [0.0] * spec.requests


def test_popularities():
    def counts(**kwargs):
        spec = WorkloadSpec(requests=20_000, num_adapters=10, **kwargs)
        return Counter(r.adapter for r in make_trace(spec, ID_RANGE))

    assert set(counts(popularity="single")) == {0}
    uniform = counts(popularity="uniform")
    assert max(uniform.values()) / min(uniform.values()) < 1.2
    # S-LoRA's power law: alpha=1 is uniform; smaller alpha skews towards adapter 0.
    flat = counts(popularity="power", alpha=1.0)
    assert max(flat.values()) / min(flat.values()) < 1.2
    skewed = counts(popularity="power", alpha=0.3)
    assert skewed[0] > 4 * skewed[9]
    zipf = counts(popularity="zipf", alpha=1.0)
    assert zipf[0] == pytest.approx(2 * zipf[1], rel=0.15)


def test_a_salted_trace_is_the_same_work_without_a_shared_prefix():
    """Salt 0 is the trace itself; another salt moves only each prompt's first token (within the id range,
    wrapping), so lengths, arrivals, adapters and outputs stay while no prompt keeps its prefix."""
    id_range = (3, 40)
    trace = make_trace(WorkloadSpec(requests=50, num_adapters=5, prompt_len=(1, 9), seed=4), id_range)
    assert salted(trace, 0, id_range) == trace
    for salt in (1, 36, 37 * 1000 + 5):
        moved = salted(trace, salt, id_range)
        for before, after in zip(trace, moved, strict=True):
            assert replace(after, prompt_ids=before.prompt_ids) == before
            assert after.prompt_ids[1:] == before.prompt_ids[1:]
            assert after.prompt_ids[0] != before.prompt_ids[0] and 3 <= after.prompt_ids[0] < 40
            assert (after.prompt_ids[0] - before.prompt_ids[0]) % 37 == salt % 37
