"""Prometheus metrics of one server, in its own registry (so several servers in a test don't collide)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from peftserve.engine.protocol import EngineClient
from peftserve.engine.request import RequestOutput

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


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
    """Gauges read from engine.stats() at scrape time."""

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


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> WSGIServer:
    """Serve registry at http://host:port/metrics from a daemon thread; port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
