"""Serving metrics summarized from per-request timings."""

from __future__ import annotations

import pytest

from peftserve.bench.records import RequestRecord, percentile, summarize


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0


def test_summary_counts_from_arrival_and_divides_by_the_makespan():
    records = [
        # index, arrival, prompt, generated, first token, finished
        RequestRecord(0, 0.0, 10, 5, 1.0, 2.0),
        RequestRecord(1, 1.0, 10, 3, 3.0, 4.0),
        RequestRecord(2, 2.0, 10, 0, None, None, error="NOT_FOUND: adapter"),
    ]
    m = summarize(records, slo_ttft_s=1.5)
    assert (m.requests, m.completed, m.failed, m.generated_tokens) == (3, 2, 1, 8)
    assert m.makespan_s == 4.0
    assert m.tokens_per_s == 2.0 and m.requests_per_s == 0.5
    assert m.ttft_p50 == pytest.approx(1.5)  # TTFTs 1.0 and 2.0
    assert m.tpot_p50 == pytest.approx((0.25 + 0.5) / 2)  # 1s over 4 gaps, 1s over 2 gaps
    assert m.latency_mean == pytest.approx(2.5)
    assert m.slo_attainment == pytest.approx(1 / 3)  # failures miss the SLO
