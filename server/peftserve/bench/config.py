"""Frozen configuration of the serving benchmark: the workload, the adapter pools, the systems.

Plain Python (no torch), so `peftserve --help` stays fast. The defaults are the issue's target
workload on bench-1b; `quick()` is the ~1 minute preset of `peftserve bench --quick`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from peftserve.bench.shapes import BENCH_SHAPES, PROJECTIONS

POPULARITIES = ("uniform", "power", "zipf", "single")
SYSTEMS = ("peftserve", "peftserve-http", "base", "peft-batched", "peft-sequential")
"""peftserve: adapters over gRPC; peftserve-http: the same server, adapters and trace through its
OpenAI-compatible HTTP API (async openai client); base: the same server and trace over gRPC, every request
on the base model (the limit); peft-batched: PEFT static batches with adapter_names=; peft-sequential:
PEFT set_adapter + generate, one request at a time."""
PEERS = ("vllm", "vllm-base")
"""Opt-in systems from the peer virtualenv (`make peer-vllm`), same model directory, adapters and trace
over the OpenAI API: vllm: vLLM's CPU build with the pool's PEFT directories as LoRA modules; vllm-base:
vLLM without LoRA, every request on the base model."""
DTYPES = ("float32", "bfloat16")
VLLM_PYTHON = ".peers/vllm/bin/python"
"""Where `make peer-vllm` puts the peer's interpreter (relative to the repository root)."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class WorkloadSpec:
    """What a trace looks like; the same spec and seed always give the same trace."""

    requests: int = 64
    """Requests in the trace."""
    num_adapters: int = 100
    """Adapters the requests are spread over (drawn from the adapter pool's first num_adapters)."""
    popularity: str = "power"
    """uniform | power (S-LoRA: adapter floor(N * u^(1/alpha)); alpha=1 is uniform, smaller skews to
    adapter 0) | zipf (P(i) proportional to (i+1)^-alpha) | single (every request on adapter 0)."""
    alpha: float = 1.0
    """Exponent of the power and zipf popularities."""
    rate: float = math.inf
    """Mean arrival rate in requests/s; inf sends every request at t=0 (saturating)."""
    cv: float = 1.0
    """Coefficient of variation of gamma inter-arrival times: 1 is Poisson, larger is burstier."""
    prompt_len: tuple[int, int] = (8, 256)
    """Prompt lengths, uniform in [lo, hi] tokens (random ids)."""
    output_len: tuple[int, int] = (8, 256)
    """Generated tokens per request, uniform in [lo, hi] (EOS ignored, so exactly that many)."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.requests > 0, f"requests must be > 0, got {self.requests}")
        _check(self.num_adapters > 0, f"num_adapters must be > 0, got {self.num_adapters}")
        _check(self.popularity in POPULARITIES, f"popularity must be one of {', '.join(POPULARITIES)}")
        _check(self.alpha > 0, f"alpha must be > 0, got {self.alpha}")
        _check(self.rate > 0, f"rate must be > 0 (inf to saturate), got {self.rate}")
        _check(self.cv > 0, f"cv must be > 0, got {self.cv}")
        for name in ("prompt_len", "output_len"):
            lo, hi = getattr(self, name)
            _check(0 < lo <= hi, f"{name} must satisfy 0 < lo <= hi, got {(lo, hi)}")

    @property
    def max_tokens(self) -> int:
        """Longest prompt plus completion a request of this workload can reach."""
        return self.prompt_len[1] + self.output_len[1]


@dataclass(frozen=True)
class AdapterPool:
    """Random-weight LoRA adapters written under one tenant of the store."""

    tenant: str
    """Store tenant (and id prefix) of the pool."""
    count: int
    ranks: tuple[int, ...] = (16,)
    """Each adapter draws its rank from this set (seeded)."""
    targets: tuple[str, ...] = PROJECTIONS
    """Projections of every layer the adapters update."""

    def __post_init__(self) -> None:
        _check(self.count > 0, f"adapter pool {self.tenant!r}: count must be > 0")
        _check(bool(self.ranks) and min(self.ranks) > 0, f"adapter pool {self.tenant!r}: ranks must be > 0")
        unknown = set(self.targets) - set(PROJECTIONS)
        _check(bool(self.targets) and not unknown, f"adapter pool {self.tenant!r}: bad targets {unknown}")

    @property
    def label(self) -> str:
        """'r16 on all 7 projections', 'r{8,16,32,64} on q_proj,v_proj'."""
        ranks = str(self.ranks[0]) if len(self.ranks) == 1 else "{" + ",".join(map(str, self.ranks)) + "}"
        where = "all 7 projections" if set(self.targets) == set(PROJECTIONS) else ",".join(self.targets)
        return f"r{ranks} on {where}"


@dataclass(frozen=True)
class BenchConfig:
    """One `peftserve bench` run: a main comparison, an adapter-count sweep and a load sweep."""

    shape: str = "bench-1b"
    """Shape of the random-weight Llama base model (DESIGN.md's, or bench-tiny for smoke tests)."""
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    """The main trace, served by every system."""
    ranks: tuple[int, ...] = (16,)
    """Ranks of the main scenario's adapters (and of the adapter-count sweep)."""
    targets: tuple[str, ...] = PROJECTIONS
    """Projections the main scenario's adapters update."""
    sweep_adapters: tuple[int, ...] = (1, 10, 100, 1000)
    """Adapter counts of the sweep (peftserve; PEFT up to peft_max_adapters)."""
    sweep_requests: int = 16
    """Requests per sweep trace (the main workload's lengths, arrivals and popularity)."""
    sweep_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Projections of the sweep's adapters: fewer than the main scenario's, so 1,000 adapters fit."""
    mixed_ranks: tuple[int, ...] = (8, 16, 32, 64)
    """Ranks of the mixed-rank run at the sweep's largest adapter count (empty: skip it)."""
    load_fractions: tuple[float, ...] = (0.5, 1.0)
    """Arrival rates of the load sweep, as fractions of peftserve's saturated req/s in the sweep."""
    systems: tuple[str, ...] = SYSTEMS
    """Systems to run (peftserve always); base and PEFT batches also run in the sweeps, peers only on the
    main trace."""
    peft_batch_size: int = 16
    """Rows of a PEFT static batch."""
    peft_sequential_limit: int | None = 8
    """PEFT one-at-a-time serves only the trace's first N requests (its tok/s carries over); None: all."""
    peft_max_adapters: int = 100
    """PEFT runs in the adapter sweep only up to this many adapters (it loads each one as modules)."""
    slo_ttft_s: float = 6.0
    """SLO attainment bound on time to first token (S-LoRA's 6 s)."""
    repeats: int = 1
    """Tries per system and trace; the one other processes disturbed least is kept (noisy machines)."""
    max_running: int = 64
    """Server: requests decoding at once (the engine's default)."""
    max_batched_tokens: int = 1024
    """Server: prefill and decode tokens per engine step (the engine's default)."""
    adapter_slots: int | None = None
    """Server: adapters resident on the device at once, and vLLM's --max-loras; None: max_running (the
    engine's default)."""
    threads: int | None = None
    """torch CPU threads of the server and of the PEFT baselines; None keeps torch's default. On a shared
    machine use 1: with more, every parallel region waits for threads other processes descheduled."""
    device: str = "cpu"
    """Where the server and PEFT run: cpu or cuda."""
    dtype: str | None = None
    """Weights, KV cache and adapters of every system: float32 or bfloat16; None: float32 on CPU,
    bfloat16 on CUDA."""
    vllm_python: str = VLLM_PYTHON
    """Interpreter of the vLLM peer virtualenv (`make peer-vllm`), for the vllm systems."""
    vllm_threads: int | None = None
    """OMP_NUM_THREADS of vLLM's engine; None: its default (all cores but one on CPU)."""
    vllm_preload: tuple[str, ...] = ()
    """Libraries vLLM runs with in LD_PRELOAD (its CPU guide's libiomp5 and tcmalloc); empty: none."""
    server_timeout_s: float = 600.0
    """How long the server may take to load the model and register every adapter."""

    @property
    def slots(self) -> int:
        """The server's adapter slots (and the vLLM peer's max_loras)."""
        return self.adapter_slots or self.max_running

    def __post_init__(self) -> None:
        shapes = ", ".join(BENCH_SHAPES)
        _check(self.shape in BENCH_SHAPES, f"shape must be one of {shapes}, got {self.shape!r}")
        unknown = set(self.systems) - set(SYSTEMS + PEERS)
        known = ", ".join(SYSTEMS + PEERS)
        _check(not unknown, f"unknown systems {sorted(unknown)}; expected some of {known}")
        _check(self.dtype in (None, *DTYPES), f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.vllm_threads is None or self.vllm_threads > 0, "vllm_threads must be > 0")
        _check("peftserve" in self.systems, "peftserve must be among the systems (ratios are against it)")
        _check(all(n > 0 for n in self.sweep_adapters), "sweep adapter counts must be > 0")
        _check(all(f > 0 for f in self.load_fractions), "load fractions must be > 0")
        _check(self.sweep_requests > 0, "sweep_requests must be > 0")
        _check(self.peft_batch_size > 0, "peft_batch_size must be > 0")
        _check(self.adapter_slots is None or self.adapter_slots > 0, "adapter_slots must be > 0")
        _check(self.slo_ttft_s > 0, "slo_ttft_s must be > 0")
        _check(self.repeats > 0, "repeats must be > 0")
        AdapterPool("check", 1, self.ranks, self.targets)
        AdapterPool("check", 1, self.mixed_ranks or (1,), self.sweep_targets)

    # -- adapter pools: one tenant each in one store -----------------------------------------

    @property
    def main_pool(self) -> AdapterPool:
        return AdapterPool("main", self.workload.num_adapters, self.ranks, self.targets)

    @property
    def sweep_pool(self) -> AdapterPool | None:
        if not self.sweep_adapters:
            return None
        return AdapterPool("sweep", max(self.sweep_adapters), self.ranks, self.sweep_targets)

    @property
    def mixed_pool(self) -> AdapterPool | None:
        if not self.sweep_adapters or not self.mixed_ranks:
            return None
        return AdapterPool("mixed", max(self.sweep_adapters), self.mixed_ranks, self.sweep_targets)

    @property
    def pools(self) -> tuple[AdapterPool, ...]:
        return tuple(p for p in (self.main_pool, self.sweep_pool, self.mixed_pool) if p is not None)

    @property
    def sweep_workload(self) -> WorkloadSpec:
        """The main workload with the sweep's request count (the adapter count is set per point)."""
        return replace(self.workload, requests=self.sweep_requests)


def quick() -> BenchConfig:
    """About a minute on 2 cores: bench-mid, 16 short requests, 8 adapters, 3 sweep and 2 load points.

    One torch thread per process: the server and PEFT never run at once, so the other core takes the
    client and whatever else the machine runs, and shared CI machines give stable numbers.
    """
    return BenchConfig(
        shape="bench-mid",
        workload=WorkloadSpec(requests=16, num_adapters=8, prompt_len=(8, 64), output_len=(8, 32)),
        sweep_adapters=(1, 8, 32),
        sweep_requests=16,
        load_fractions=(0.5, 1.0),
        peft_batch_size=8,
        peft_sequential_limit=4,
        peft_max_adapters=8,
        threads=1,
    )
