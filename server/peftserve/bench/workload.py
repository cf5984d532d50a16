"""Seeded request traces: arrival times, adapter per request, prompt ids and output lengths.

Each property comes from its own random stream, so traces that differ in one knob share the rest:
changing the adapter count or popularity keeps every arrival, prompt and length; changing the rate
keeps every adapter, prompt and length. Every system of a scenario is sent the identical trace.
Plain Python (no torch).
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace

from peftserve.bench.config import WorkloadSpec


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    index: int
    arrival: float
    """Seconds after the trace starts at which the request is sent."""
    adapter: int
    """Index into the adapter pool (0 .. num_adapters - 1)."""
    prompt_ids: tuple[int, ...]
    output_len: int
    """Tokens to generate (EOS ignored)."""


def _stream(spec: WorkloadSpec, name: str) -> random.Random:
    return random.Random(f"{spec.seed}:{name}")


def arrival_times(spec: WorkloadSpec) -> list[float]:
    """Cumulative gamma inter-arrival times with mean 1/rate and the spec's CV; all 0 at rate inf.

    Gamma(shape=1/cv^2, scale=cv^2/rate), as S-LoRA's trace generator: cv=1 is a Poisson process.
    The first request arrives at 0, so traces of any rate start at once.
    """
    if math.isinf(spec.rate):
        return [0.0] * spec.requests
    rng = _stream(spec, "arrivals")
    shape, scale = 1.0 / spec.cv**2, spec.cv**2 / spec.rate
    gaps = [0.0] + [rng.gammavariate(shape, scale) for _ in range(spec.requests - 1)]
    return list(itertools.accumulate(gaps))


def adapter_choices(spec: WorkloadSpec) -> list[int]:
    """The adapter index of every request under the spec's popularity."""
    rng, n = _stream(spec, "adapters"), spec.num_adapters
    if spec.popularity == "single":
        return [0] * spec.requests
    if spec.popularity == "uniform":
        return [rng.randrange(n) for _ in range(spec.requests)]
    if spec.popularity == "power":  # numpy.random.power(alpha) is u^(1/alpha)
        return [min(int(n * rng.random() ** (1.0 / spec.alpha)), n - 1) for _ in range(spec.requests)]
    weights = [(i + 1) ** -spec.alpha for i in range(n)]  # zipf
    return rng.choices(range(n), weights=weights, k=spec.requests)


def make_trace(spec: WorkloadSpec, id_range: tuple[int, int]) -> list[TraceRequest]:
    """The spec's requests in arrival order; prompt ids uniform in [lo, hi)."""
    lo, hi = id_range
    rng = _stream(spec, "requests")
    prompts, outputs = [], []
    for _ in range(spec.requests):
        prompts.append(tuple(rng.randrange(lo, hi) for _ in range(rng.randint(*spec.prompt_len))))
        outputs.append(rng.randint(*spec.output_len))
    return [
        TraceRequest(i, arrival, adapter, prompt, output)
        for i, (arrival, adapter, prompt, output) in enumerate(
            zip(arrival_times(spec), adapter_choices(spec), prompts, outputs, strict=True)
        )
    ]


def describe(trace: list[TraceRequest]) -> dict[str, object]:
    """Summary of a trace for results.json: sizes, span of arrivals, how adapters are spread."""
    counts = Counter(r.adapter for r in trace)
    return {
        "requests": len(trace),
        "prompt_tokens": sum(len(r.prompt_ids) for r in trace),
        "output_tokens": sum(r.output_len for r in trace),
        "last_arrival_s": max((r.arrival for r in trace), default=0.0),
        "distinct_adapters": len(counts),
        "top_adapter_share": max(counts.values()) / len(trace) if trace else 0.0,
    }


def salted(trace: Sequence[TraceRequest], salt: int, id_range: tuple[int, int]) -> list[TraceRequest]:
    """The trace with every prompt's first token moved `salt` places within id_range (salt 0: as it is).

    Lengths, arrivals and adapters stay, so the work is the same; but a prompt shares no prefix with the
    same prompt under another salt, so a try never finds an earlier try's KV blocks in a server's prefix
    cache (which would make every repeat after the first one faster than the first)."""
    if salt == 0:
        return list(trace)
    low, high = id_range
    moved = [(r.prompt_ids[0] - low + salt) % (high - low) + low for r in trace]
    return [replace(r, prompt_ids=(first, *r.prompt_ids[1:])) for r, first in zip(trace, moved, strict=True)]
