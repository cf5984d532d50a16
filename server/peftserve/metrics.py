"""Prometheus metrics of one server, in its own registry (so several servers in a test don't collide)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peftserve.config import TlsConfig
from peftserve.engine.protocol import EngineClient
from peftserve.engine.request import RequestOutput

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
OTHER_ADAPTERS = "other"
"""The label of every adapter outside the top N by traffic."""


@dataclass
class RequestTrace:
    """Timing and token counts of one request as the servicer sees its increments."""

    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def observe(self, output: RequestOutput) -> None:
        """Record one engine increment."""
        if output.token_ids:
            now = time.perf_counter()
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
        self.prompt_tokens = output.prompt_tokens
        self.completion_tokens = output.completion_tokens


class EngineStatsCollector(Collector):
    """Gauges and the prefix cache's counters, read from engine.stats() at scrape time."""

    def __init__(self, engine: EngineClient) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._engine.stats()
        except Exception:  # a scrape must not fail because the engine is busy or gone
            logger.warning("engine.stats() failed during a metrics scrape", exc_info=True)
            return
        yield GaugeMetricFamily("peftserve_queue_depth", "Requests waiting for admission.", stats.waiting)
        yield GaugeMetricFamily("peftserve_running_requests", "Requests being decoded.", stats.running)
        yield GaugeMetricFamily("peftserve_kv_blocks_used", "KV cache blocks in use.", stats.kv_blocks_used)
        yield GaugeMetricFamily("peftserve_kv_blocks_free", "KV cache blocks free.", stats.kv_blocks_free)
        yield GaugeMetricFamily(
            "peftserve_warming",
            "Warm-up work still running in the background (attention, adapter kernels, weight packing).",
            stats.warming,
        )
        cache = stats.prefix_cache
        if cache is not None:
            yield CounterMetricFamily(
                "peftserve_prefix_cache_query_tokens",
                "Prompt tokens looked up in the prefix cache at admission.",
                cache.query_tokens,
            )
            yield CounterMetricFamily(
                "peftserve_prefix_cache_hit_tokens",
                "Prompt tokens found in the prefix cache (their KV reused, not computed).",
                cache.hit_tokens,
            )
            yield GaugeMetricFamily(
                "peftserve_prefix_cache_hit_rate",
                "Prefix-cache hit tokens over query tokens since start.",
                cache.hit_rate,
            )
            yield GaugeMetricFamily(
                "peftserve_prefix_cache_blocks",
                "KV blocks in the prefix cache, in use or not.",
                cache.cached_blocks,
            )
            yield CounterMetricFamily(
                "peftserve_prefix_cache_evictions",
                "Prefix-cache blocks dropped to make room.",
                cache.evictions,
            )


@dataclass(frozen=True)
class AdapterSnapshot:
    """The adapter tiers' plain counters and sizes, taken at scrape time (tier: disk, host, device)."""

    loads: dict[str, int]
    load_failures: dict[str, int]
    evictions: dict[str, int]
    resident: dict[str, int]
    host_bytes: int
    cache_hits: int
    cache_misses: int


class AdapterTraffic:
    """Requests and generated tokens per adapter id; exported as the top N by requests plus 'other'.

    Every id is counted exactly (the registry bounds how many there are); the export bounds the labels.
    'other' is the remainder, so it can step down when an adapter enters the top N.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, list[int]] = {}  # id -> [requests, tokens]
        self._forgotten = [0, 0]

    def record(self, adapter_id: str, tokens: int) -> None:
        with self._lock:
            counts = self._counts.setdefault(adapter_id, [0, 0])
            counts[0] += 1
            counts[1] += tokens

    def forget(self, adapter_id: str) -> None:
        """A deleted adapter's counts move to 'other'."""
        with self._lock:
            counts = self._counts.pop(adapter_id, [0, 0])
            self._forgotten = [self._forgotten[0] + counts[0], self._forgotten[1] + counts[1]]

    def top(self, n: int) -> list[tuple[str, int, int]]:
        """(id, requests, tokens) of the n busiest adapters, then ('other', requests, tokens)."""
        with self._lock:
            ranked = sorted(self._counts.items(), key=lambda kv: (-kv[1][0], kv[0]))
            rest = [sum(c[i] for _, c in ranked[n:]) + self._forgotten[i] for i in (0, 1)]
            return [(i, c[0], c[1]) for i, c in ranked[:n]] + [(OTHER_ADAPTERS, rest[0], rest[1])]


class AdapterMetrics(Collector):
    """Adapter loads, latency per tier, host-cache hits/misses, evictions, residency and traffic.

    Counters come from the tiers' own plain counters at scrape time (snapshot); only the load latency
    is observed as it happens. Register it in a server's registry (ServerMetrics does).
    """

    def __init__(self, snapshot: Callable[[], AdapterSnapshot], top_n: int = 20) -> None:
        self._snapshot = snapshot
        self.top_n = top_n
        self.traffic = AdapterTraffic()
        self.load_seconds = Histogram(
            "peftserve_adapter_load_seconds",
            "Time to load an adapter version into a tier: host (disk to CPU memory), device (into a slot).",
            ["tier"],
            buckets=_LOAD_BUCKETS,
            registry=None,
        )

    def observe_load(self, tier: str, seconds: float) -> None:
        self.load_seconds.labels(tier=tier).observe(seconds)

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        per_tier = (
            ("peftserve_adapter_loads", "Adapter versions loaded into a tier.", snap.loads),
            ("peftserve_adapter_load_failures", "Adapter loads that failed, per tier.", snap.load_failures),
            ("peftserve_adapter_evictions", "Adapter versions evicted from a tier.", snap.evictions),
        )
        for name, text, values in per_tier:
            family = CounterMetricFamily(name, text, labels=["tier"])
            for tier, value in values.items():
                family.add_metric([tier], value)
            yield family
        resident = GaugeMetricFamily(
            "peftserve_adapters_resident",
            "Adapters per tier: disk counts registered adapters, host and device resident versions.",
            labels=["tier"],
        )
        for tier, value in snap.resident.items():
            resident.add_metric([tier], value)
        yield resident
        yield GaugeMetricFamily(
            "peftserve_adapter_host_cache_bytes", "Bytes of adapters in the host cache.", snap.host_bytes
        )
        yield CounterMetricFamily(
            "peftserve_adapter_cache_hits", "Requests whose adapter was in host memory.", snap.cache_hits
        )
        yield CounterMetricFamily(
            "peftserve_adapter_cache_misses", "Requests that waited for an adapter load.", snap.cache_misses
        )
        yield from self.load_seconds.collect()
        requests = CounterMetricFamily(
            "peftserve_adapter_requests",
            f"Finished requests per adapter (top {self.top_n}, other).",
            labels=["adapter"],
        )
        tokens = CounterMetricFamily(
            "peftserve_adapter_generated_tokens",
            f"Generated tokens per adapter (top {self.top_n} by requests, other).",
            labels=["adapter"],
        )
        for adapter_id, n_requests, n_tokens in self.traffic.top(self.top_n):
            requests.add_metric([adapter_id], n_requests)
            tokens.add_metric([adapter_id], n_tokens)
        yield requests
        yield tokens


class ServerMetrics:
    """The request metrics the servicer records, plus the engine's gauges."""

    def __init__(self, engine: EngineClient | None = None, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "peftserve_requests",
            "Finished generation requests (Generate, GenerateStream) by gRPC status code.",
            ["status"],
            registry=r,
        )
        self.prompt_tokens = Counter("peftserve_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("peftserve_generation_tokens", "Tokens generated.", registry=r)
        self.time_to_first_token = Histogram(
            "peftserve_time_to_first_token_seconds",
            "Time from request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "peftserve_time_per_output_token_seconds",
            "Mean time between generated tokens of a request, after the first.",
            buckets=_PER_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "peftserve_request_duration_seconds",
            "Time from request arrival to its end, whatever the outcome.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        if engine is not None:
            r.register(EngineStatsCollector(engine))
            adapters = getattr(engine, "adapter_metrics", None)
            if adapters is not None:
                r.register(adapters)

    def record(self, trace: RequestTrace, status: str) -> None:
        """Record a finished request with its gRPC status code name (OK, INVALID_ARGUMENT, ...)."""
        self.requests.labels(status=status).inc()
        self.request_duration.observe(time.perf_counter() - trace.start)
        self.prompt_tokens.inc(trace.prompt_tokens)
        self.generation_tokens.inc(trace.completion_tokens)
        if trace.first_token is not None:
            self.time_to_first_token.observe(trace.first_token - trace.start)
            if trace.last_token is not None and trace.completion_tokens > 1:
                gaps = trace.completion_tokens - 1
                self.time_per_output_token.observe((trace.last_token - trace.first_token) / gaps)


def start_metrics_server(
    port: int, registry: CollectorRegistry, host: str = "0.0.0.0", tls: TlsConfig | None = None
) -> WSGIServer:
    """Serve registry at http(s)://host:port/metrics from a daemon thread; port 0 picks a free one.

    With tls, over TLS (client certificates required when it has a client CA)."""
    files = {}
    if tls is not None:
        files = {"certfile": tls.cert_file, "keyfile": tls.key_file}
        if tls.client_ca_file:
            files |= {"client_cafile": tls.client_ca_file, "client_auth_required": True}
    server, _thread = start_http_server(port, addr=host, registry=registry, **files)
    return server
