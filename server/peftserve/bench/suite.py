"""One benchmark run: build the model and adapters, start the server, run every scenario, collect runs.

Scenarios (each system of a scenario gets the identical trace):

    main      the configured workload: peftserve over gRPC and over HTTP, base (the limit), PEFT static
              batches, PEFT one at a time; opt-in, vLLM with the same adapters and without LoRA
    adapters  the sweep: peftserve (and PEFT batches up to peft_max_adapters) per adapter count, the base
              once, and peftserve with mixed ranks at the largest count
    load      peftserve and base at arrival rates that are fractions of peftserve's saturated req/s
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerFast

from peftserve.bench import grpc_system, http_system, vllm_system
from peftserve.bench.adapters import PublishedPool, publish_pool, registration_flags
from peftserve.bench.config import BenchConfig, WorkloadSpec
from peftserve.bench.machine import CpuSample, cpu_sample, environment, other_cores, peak_matmul_rate
from peftserve.bench.models import bench_tokenizer, build_model
from peftserve.bench.peft_system import PeftBaseline
from peftserve.bench.records import RequestRecord, RunMetrics, summarize
from peftserve.bench.server import ServerProcess
from peftserve.bench.shapes import BENCH_SHAPES, Shape, useful_flops
from peftserve.bench.vllm_system import VllmSpec
from peftserve.bench.workload import TraceRequest, describe, make_trace, salted
from peftserve.model.tokenizer import save_tokenizer

Log = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    """What one run serves: a scenario's trace, on one system, over one adapter pool."""

    scenario: str
    system: str
    trace: Sequence[TraceRequest]
    pool: str | None
    num_adapters: int | None
    note: str = ""


Measure = Callable[[int], tuple[list[RequestRecord], dict[str, float] | None]]
"""Serves a job's trace once: the records, and the server's adapter counters during it (or None). Its
argument is the try's salt: a system with a prefix cache sends the trace `salted` by it, so that no try
finds another try's prompts in the cache."""


@dataclass
class Run:
    """One system on one trace."""

    scenario: str
    system: str
    num_adapters: int | None
    """Adapters the trace spreads over (None: every request on the base model)."""
    rate: float
    """Mean arrival rate of the trace in req/s (inf: all at once)."""
    pool: str | None
    """Tenant of the adapter pool served (None for the base model)."""
    metrics: RunMetrics
    useful_flops: float
    records: list[RequestRecord] = field(repr=False)
    adapter_events: dict[str, float] | None = None
    """Adapter load/eviction counters of the server during the run; None where it exports none."""
    other_cores: float | None = None
    """CPU cores other processes on the machine kept busy during the run (noise); None if unknown."""
    own_cpu_s: float | None = None
    """CPU-seconds the system itself used (server and client, or the PEFT process); None if unknown."""
    note: str = ""

    def mfu(self, peak_flops: float) -> float | None:
        seconds = self.metrics.makespan_s
        return self.useful_flops / seconds / peak_flops if seconds > 0 and peak_flops > 0 else None

    @property
    def tokens_per_cpu_s(self) -> float | None:
        """Generated tokens per CPU-second of the system's own processes: what other load barely moves."""
        return self.metrics.generated_tokens / self.own_cpu_s if self.own_cpu_s else None


OTHER_LOAD_RESOLUTION = 0.1
"""Cores of other load told apart when picking a try (what the report shows): below it, noise."""


def least_disturbed(tries: Sequence[Run]) -> Run:
    """The try with the least other load, to the resolution the machine's counters give; among tries as
    undisturbed as each other, the fastest (what unmeasured noise, a descheduled thread, slowed least)."""
    return min(
        tries,
        key=lambda r: (round((r.other_cores or 0.0) / OTHER_LOAD_RESOLUTION), -r.metrics.tokens_per_s),
    )


@dataclass
class SuiteResult:
    """Everything a report needs: what ran where, and every run's raw records and metrics."""

    config: BenchConfig
    environment: dict[str, object]
    matmul_flops_per_s: float
    pools: dict[str, dict[str, object]]
    traces: dict[str, dict[str, object]]
    runs: list[Run]
    seconds: float = 0.0

    def find(self, scenario: str, system: str, num_adapters: int | None = None) -> Run | None:
        for run in self.runs:
            if run.scenario == scenario and run.system == system:
                if num_adapters is None or run.num_adapters == num_adapters:
                    return run
        return None


def serving_dtype(config: BenchConfig) -> str:
    """The configured dtype, else float32 on CPU and bfloat16 on CUDA; named so every system agrees."""
    if config.dtype is not None:
        return config.dtype
    return "float32" if torch.device(config.device).type == "cpu" else "bfloat16"


def prepare_model(
    shape: Shape, tokenizer: PreTrainedTokenizerFast, directory: Path, device: str, seed: int, dtype: str
) -> torch.nn.Module:
    """The seeded base model in memory, saved once per shape, seed and dtype (with the tokenizer) for the
    servers."""
    model = build_model(shape, device=device, dtype=getattr(torch, dtype), seed=seed)
    stamp = {"shape": asdict(shape), "seed": seed, "dtype": dtype}
    stamp_file = directory / "bench_stamp.json"
    if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp):
        directory.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(directory)
        save_tokenizer(tokenizer, directory)
        stamp_file.write_text(json.dumps(stamp, indent=2) + "\n")
    return model


def serve_args(
    config: BenchConfig, shape: Shape, model_dir: Path, pools: Sequence[PublishedPool]
) -> list[str]:
    """Flags of `peftserve serve`: the pools' adapters, a KV budget for max_running longest requests, and
    the warm-up done before it serves: the runs measure serving at full speed (bench_startup.py measures
    the start), as the peers', which warm up before they serve. The weights are packed at every start and
    not kept, so that no write of them runs beside the runs (the steps are as fast on kept weights:
    benchmarks/README.md, "Packed weights kept across starts")."""
    dtype = serving_dtype(config)
    args = [
        "--model", str(model_dir),
        "--device", config.device,
        "--dtype", dtype,
        "--kv-cache-mb", f"{kv_cache_mb(config, shape):.0f}",
        "--max-running", str(config.max_running),
        "--max-batched-tokens", str(config.max_batched_tokens),
        "--adapter-slots", str(config.slots),
        "--max-queue", str(max(1024, config.workload.requests, config.sweep_requests)),
        "--grace-s", "5",
        "--warm-up", "before",
        "--packed-cache", "off",
    ]  # fmt: skip
    if config.threads:
        args += ["--threads", str(config.threads)]
    if "peftserve-http" in config.systems:
        args += ["--http-port", "0"]
    return args + registration_flags(pools)


def kv_cache_mb(config: BenchConfig, shape: Shape) -> float:
    """A KV budget for max_running requests of the longest the workload makes (any server's)."""
    per_token = shape.kv_bytes_per_token(getattr(torch, serving_dtype(config)).itemsize)
    return max(64.0, 1.25 * config.max_running * (config.workload.max_tokens + 16) * per_token / 2**20)


def vllm_spec(config: BenchConfig, shape: Shape, model_dir: Path, pool: PublishedPool | None) -> VllmSpec:
    """The vLLM peer on the same model directory, budgets and (unless pool is None) adapters as peftserve."""
    return VllmSpec(
        python=Path(config.vllm_python),
        model_dir=model_dir,
        dtype=serving_dtype(config),
        adapters=vllm_system.adapter_pairs(pool.ids, pool.directories) if pool else (),
        max_lora_rank=max(pool.ranks) if pool else 16,
        max_loras=config.slots,
        max_num_seqs=config.max_running,
        max_model_len=config.workload.max_tokens + 16,
        kv_cache_gib=kv_cache_mb(config, shape) / 1024,
        threads=config.vllm_threads,
        preload=tuple(map(Path, config.vllm_preload)),
    )


class Bench:
    """Runs the scenarios of one config against one server and one PEFT baseline."""

    def __init__(self, config: BenchConfig, vocab: int, work_dir: Path, log: Log) -> None:
        self.config = config
        self.work_dir = work_dir
        self.log = log
        self.shape = BENCH_SHAPES[config.shape]
        self.runs: list[Run] = []
        self.traces: dict[str, dict[str, object]] = {}
        self.id_range = (3, min(vocab, self.shape.vocab))
        """Prompt ids: past the tokenizer's specials, known to both the tokenizer and the model."""
        self.server: ServerProcess | None = None
        self.address = ""
        self.http_url = ""
        """Root of the server's HTTP API when peftserve-http runs."""
        self.peft: PeftBaseline | None = None
        self.published: dict[str, PublishedPool] = {}
        self.peer_pids: list[int] = []
        """Processes of a peer server now running (their CPU time is the system's own, not noise)."""
        self._tries = 0
        """Tries measured so far: the next try's salt (Measure)."""

    def trace(self, key: str, spec: WorkloadSpec) -> list[TraceRequest]:
        trace = make_trace(spec, self.id_range)
        self.traces[key] = {**describe(trace), "spec": asdict(spec)}
        return trace

    # -- systems --------------------------------------------------------------------------------

    def _cpu(self) -> CpuSample | None:
        """CPU counters of the machine, of this process and of the server."""
        return cpu_sample([os.getpid(), *([self.server.proc.pid] if self.server else []), *self.peer_pids])

    def _run(self, job: Job, measure: Measure) -> Run:
        """Measure the job `repeats` times, keep the try other processes disturbed least."""
        return self.run_in_turns([(job, measure)])[0]

    def run_in_turns(self, jobs: Sequence[tuple[Job, Measure]]) -> list[Run]:
        """Measure each job `repeats` times, the jobs taking turns (so a burst of other load on a shared
        machine hits them alike), and keep each job's least disturbed try."""
        tries: list[list[Run]] = [[] for _ in jobs]
        for _ in range(self.config.repeats):
            for (job, measure), job_tries in zip(jobs, tries, strict=True):
                started, cpu_before = time.perf_counter(), self._cpu()
                records, events = measure(self._tries)
                self._tries += 1
                job_tries.append(self._summarize(job, records, events, started, cpu_before))
        runs = []
        for job_tries in tries:
            run = least_disturbed(job_tries)
            if len(job_tries) > 1:
                run.note = "; ".join(filter(None, [run.note, f"least disturbed of {len(job_tries)}"]))
            self.runs.append(run)
            runs.append(run)
        return runs

    def _summarize(
        self,
        job: Job,
        records: list[RequestRecord],
        events: dict[str, float] | None,
        started: float,
        cpu_before: CpuSample | None,
    ) -> Run:
        """One try as a Run, logged."""
        cpu_after = self._cpu()
        noise = other_cores(cpu_before, cpu_after)
        own_cpu = cpu_after.own_s - cpu_before.own_s if cpu_before and cpu_after else None
        done = [r for r in records if r.error is None]
        errors = sorted({r.error for r in records if r.error})
        note = job.note
        if errors:
            note = "; ".join(filter(None, [note, f"{len(records) - len(done)} failed: {errors[0]}"]))
        flops = useful_flops(self.shape, [r.prompt_tokens for r in done], [r.output_tokens for r in done])
        metrics = summarize(records, self.config.slo_ttft_s)
        rate = _rate_of(job.trace)
        run = Run(
            job.scenario, job.system, job.num_adapters, rate, job.pool, metrics, flops, records, events,
            noise, own_cpu, note,
        )  # fmt: skip
        where = f"{job.num_adapters} adapters" if job.num_adapters else "base"
        shown_rate = "saturating" if math.isinf(rate) else f"{rate:.2f} req/s"
        busy = "" if noise is None else f", other processes {noise:.1f} cores"
        self.log(
            f"[{job.scenario}] {job.system} ({where}, {shown_rate}): {metrics.tokens_per_s:.1f} tok/s, "
            f"{metrics.requests_per_s:.2f} req/s, TTFT p50 {metrics.ttft_p50 or 0:.2f}s"
            f"{', ' + note if note else ''} ({time.perf_counter() - started:.0f}s{busy})"
        )
        return run

    def peftserve(
        self, scenario: str, trace: Sequence[TraceRequest], pool: str | None, n: int | None, system: str = ""
    ) -> Run:
        """The trace over gRPC: on the pool's adapters, or on the base model when pool is None."""
        return self._run(*self.peftserve_job(scenario, trace, pool, n, system))

    def peftserve_job(
        self,
        scenario: str,
        trace: Sequence[TraceRequest],
        pool: str | None,
        n: int | None,
        system: str = "",
        http: bool = False,
    ) -> tuple[Job, Measure]:
        """The trace over gRPC, or over HTTP, as a job to measure (see peftserve)."""
        job = Job(scenario, system or ("base" if pool is None else "peftserve"), trace, pool, n)
        ids = self.published[pool].ids if pool else None
        server = self.server
        assert server is not None

        def measure(salt: int) -> tuple[list[RequestRecord], dict[str, float] | None]:
            before = server.adapter_counters()
            requests = salted(trace, salt, self.id_range)
            if http:
                records = http_system.run_trace(self.http_url, requests, ids)
            else:
                records = grpc_system.run_trace(self.address, requests, ids)
            after = server.adapter_counters()
            events = {k: v - (before or {}).get(k, 0.0) for k, v in after.items()} if after else None
            return records, events

        return job, measure

    def peft_run(self, scenario: str, system: str, trace: Sequence[TraceRequest], pool: str, n: int) -> Run:
        """One of the PEFT policies on the trace (peft-batched or peft-sequential)."""
        peft = self.peft
        assert peft is not None
        published = self.published[pool]
        names = [published.peft_name(i) for i in range(published.pool.count)]
        batch_size, limit = self.config.peft_batch_size, self.config.peft_sequential_limit
        if system == "peft-batched":
            job = Job(scenario, system, trace, pool, n, f"batches of {batch_size}")
            return self._run(job, lambda _: (peft.static_batches(trace, names, batch_size), None))
        note = ""
        if limit is not None and limit < len(trace):
            trace, note = trace[:limit], f"first {limit} requests only"
        job = Job(scenario, system, trace, pool, n, note)
        return self._run(job, lambda _: (peft.one_at_a_time(trace, names), None))

    def vllm_run(self, scenario: str, trace: Sequence[TraceRequest], pool: str | None, n: int | None) -> Run:
        """The trace on a vLLM server started for it: with the pool's adapters (vllm), or LoRA off and
        every request on the base model (vllm-base, when pool is None)."""
        config = self.config
        published = self.published[pool] if pool else None
        spec = vllm_spec(config, self.shape, self.work_dir / "model", published)
        name = "vllm" if pool else "vllm-base"
        self.log(f"[{scenario}] starting {name} ({spec.dtype}) from {spec.python}")
        with vllm_system.VllmServer(spec, self.work_dir / f"{name}.log") as server:
            url = server.wait_ready(config.server_timeout_s)
            ids = published.ids if published else None
            http_system.warm_up(url, ids[:2] if ids else [spec.served_name])
            self.peer_pids = server.pids()
            job = Job(scenario, name, trace, pool, n, f"vLLM {spec.dtype}")
            try:
                id_range = self.id_range  # vLLM caches prefixes too
                return self._run(
                    job, lambda salt: (http_system.run_trace(url, salted(trace, salt, id_range), ids), None)
                )
            finally:
                self.peer_pids = []

    # -- setup ----------------------------------------------------------------------------------

    def setup(self, model: torch.nn.Module, peft_traces: dict[str, list[list[TraceRequest]]]) -> None:
        """Start the server; while it loads, load into PEFT the adapters its traces use; then warm both."""
        config = self.config
        self.server = ServerProcess.serve(
            serve_args(config, self.shape, self.work_dir / "model", list(self.published.values())),
            self.work_dir / "server.log",
        )
        if any(s.startswith("peft") for s in config.systems):
            self.peft = PeftBaseline(model)
            for tenant, traces in peft_traces.items():
                self.peft.load(self.published[tenant], [r.adapter for t in traces for r in t])
        self.address = self.server.wait_ready(config.server_timeout_s)
        main = self.published[config.main_pool.tenant]
        grpc_system.warm_up(self.address, main.ids[:2])
        if "peftserve-http" in config.systems:
            assert self.server.http_url is not None, "the server logged no HTTP address"
            self.http_url = self.server.http_url
            http_system.warm_up(self.http_url, main.ids[:2])
        if self.peft is not None:
            warm = [TraceRequest(i, 0.0, 0, (5, 6, 7, 8), 3) for i in range(2)]
            names = [min(self.peft.names)]
            self.peft.static_batches(warm, names, 2)
            self.peft.one_at_a_time(warm[:1], names)


def _rate_of(trace: Sequence[TraceRequest]) -> float:
    """The trace's arrival rate in req/s (inf when every request arrives at once)."""
    span = max(r.arrival for r in trace)
    return (len(trace) - 1) / span if span > 0 else math.inf


def run_suite(config: BenchConfig, work_dir: Path, log: Log = print) -> SuiteResult:
    """Run every scenario of the config; the server is stopped whatever happens."""
    began = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    tokenizer = bench_tokenizer()
    bench = Bench(config, len(tokenizer), work_dir, log)
    shape = bench.shape
    dtype_name = serving_dtype(config)
    model = prepare_model(
        shape, tokenizer, work_dir / "model", config.device, seed=config.workload.seed, dtype=dtype_name
    )
    store = work_dir / "store"
    for pool in config.pools:
        bench.published[pool.tenant] = publish_pool(
            store, pool, shape, config.workload.seed, work_dir / "stamps"
        )
    adapters = sum(p.count for p in config.pools)
    log(f"model and {adapters} adapters ready in {work_dir} ({time.perf_counter() - began:.0f}s)")

    main_trace = bench.trace("main", config.workload)
    sweep_traces = {
        n: bench.trace(f"adapters/{n}", replace(config.sweep_workload, num_adapters=n))
        for n in config.sweep_adapters
    }
    peft_traces: dict[str, list[list[TraceRequest]]] = {config.main_pool.tenant: [main_trace]}
    if config.sweep_pool is not None and "peft-batched" in config.systems:
        peft_traces[config.sweep_pool.tenant] = [
            t for n, t in sweep_traces.items() if n <= config.peft_max_adapters
        ]

    dtype = getattr(torch, dtype_name)
    before = peak_matmul_rate(config.device, dtype)
    log(f"dense matmul rate: {before / 1e9:.1f} GFLOP/s")
    try:
        bench.setup(model, peft_traces)
        _main(bench, main_trace)
        _adapter_sweep(bench, sweep_traces)
        _load_sweep(bench)
    finally:
        if bench.server is not None:
            bench.server.stop()
            bench.server = None  # gone: its pid no longer counts in CPU samples
    _peers(bench, main_trace)  # after peftserve's server is gone: each server has the machine to itself
    # Measured again at the end: on a shared machine the better of the two is the closer to its peak.
    after = peak_matmul_rate(config.device, dtype)
    log(f"dense matmul rate at the end: {after / 1e9:.1f} GFLOP/s")
    peak = max(before, after)
    pools = {
        tenant: {
            "label": p.pool.label,
            "count": p.pool.count,
            "mean_adapter_mb": sum(p.adapter_bytes) / len(p.adapter_bytes) / 2**20,
        }
        for tenant, p in bench.published.items()
    }
    env = environment(config.device)
    return SuiteResult(config, env, peak, pools, bench.traces, bench.runs, time.perf_counter() - began)


def _main(bench: Bench, trace: list[TraceRequest]) -> None:
    config, tenant = bench.config, bench.config.main_pool.tenant
    n = config.workload.num_adapters
    jobs = [bench.peftserve_job("main", trace, tenant, n)]
    if "peftserve-http" in config.systems:  # taking turns with gRPC: the two front doors compare fairly
        jobs.append(bench.peftserve_job("main", trace, tenant, n, system="peftserve-http", http=True))
    if "base" in config.systems:  # and with the base model: the ratio to it is a target
        jobs.append(bench.peftserve_job("main", trace, None, None))
    bench.run_in_turns(jobs)
    for system in ("peft-batched", "peft-sequential"):
        if system in config.systems:
            bench.peft_run("main", system, trace, tenant, n)


def _peers(bench: Bench, trace: list[TraceRequest]) -> None:
    config, tenant = bench.config, bench.config.main_pool.tenant
    if "vllm" in config.systems:
        bench.vllm_run("main", trace, tenant, config.workload.num_adapters)
    if "vllm-base" in config.systems:
        bench.vllm_run("main", trace, None, None)


def _adapter_sweep(bench: Bench, traces: dict[int, list[TraceRequest]]) -> None:
    config = bench.config
    if not traces:
        return
    sweep, mixed = config.sweep_pool, config.mixed_pool
    assert sweep is not None
    for n, trace in traces.items():
        bench.peftserve("adapters", trace, sweep.tenant, n)
        if "peft-batched" in config.systems and n <= config.peft_max_adapters:
            bench.peft_run("adapters", "peft-batched", trace, sweep.tenant, n)
    largest = max(traces)
    if "base" in config.systems:
        bench.peftserve("adapters", traces[largest], None, None)
    if mixed is not None:
        bench.peftserve("adapters", traces[largest], mixed.tenant, largest, system="peftserve-mixed")


def _load_sweep(bench: Bench) -> None:
    """Rates as fractions of the saturated req/s peftserve reached on the sweep's workload."""
    config = bench.config
    saturated = [r for r in bench.runs if r.system == "peftserve" and r.scenario == "adapters"]
    saturated = saturated or [r for r in bench.runs if r.system == "peftserve"]
    capacity = max(r.metrics.requests_per_s for r in saturated)
    tenant, n = config.main_pool.tenant, config.workload.num_adapters
    for fraction in config.load_fractions:
        spec = replace(config.sweep_workload, num_adapters=n, rate=fraction * capacity)
        trace = bench.trace(f"load/{fraction:g}", spec)
        bench.peftserve("load", trace, tenant, n)
        if "base" in config.systems:
            bench.peftserve("load", trace, None, None)
