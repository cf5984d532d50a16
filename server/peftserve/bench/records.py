"""Per-request timings of one run and the serving metrics summarized from them (plain Python).

All times are seconds after the trace started. TTFT counts from the request's arrival (the time it was
due, so a system that falls behind pays for it), TPOT is the mean gap between a request's tokens
after its first, end-to-end latency runs from arrival to the last token. Throughput divides by the
makespan: trace start to the last request's last token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """What one system measured for one trace request."""

    index: int
    arrival: float
    prompt_tokens: int
    output_tokens: int
    """Tokens actually generated."""
    first_token: float | None
    """When the first generated token reached the client (None if none did)."""
    finished: float | None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.first_token is None or self.finished is None or self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)

    @property
    def latency(self) -> float | None:
        return None if self.finished is None else self.finished - self.arrival


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(position), math.ceil(position)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


@dataclass(frozen=True)
class RunMetrics:
    """The serving metrics of one system on one trace."""

    requests: int
    completed: int
    failed: int
    generated_tokens: int
    makespan_s: float
    requests_per_s: float
    tokens_per_s: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p99: float | None
    latency_mean: float | None
    latency_p50: float | None
    latency_p99: float | None
    slo_attainment: float
    """Share of all requests whose first token came within the SLO bound (failures miss it)."""
    slo_ttft_s: float


def summarize(records: Sequence[RequestRecord], slo_ttft_s: float) -> RunMetrics:
    """RunMetrics of a run's records."""
    done = [r for r in records if r.error is None and r.finished is not None]
    makespan = max((r.finished for r in done), default=0.0)
    generated = sum(r.output_tokens for r in done)
    ttfts = [t for r in done if (t := r.ttft) is not None]
    tpots = [t for r in done if (t := r.tpot) is not None]
    latencies = [t for r in done if (t := r.latency) is not None]
    on_time = sum(1 for t in ttfts if t <= slo_ttft_s)
    return RunMetrics(
        requests=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        generated_tokens=generated,
        makespan_s=makespan,
        requests_per_s=len(done) / makespan if makespan > 0 else 0.0,
        tokens_per_s=generated / makespan if makespan > 0 else 0.0,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p99=percentile(tpots, 99),
        latency_mean=sum(latencies) / len(latencies) if latencies else None,
        latency_p50=percentile(latencies, 50),
        latency_p99=percentile(latencies, 99),
        slo_attainment=on_time / len(records) if records else 0.0,
        slo_ttft_s=slo_ttft_s,
    )
