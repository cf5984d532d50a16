"""Adapter metrics: tier counters from the plain stats at scrape time, latency, bounded per-adapter labels."""

from __future__ import annotations

from prometheus_client import generate_latest

from peftserve.engine.protocol import EngineStats, PrefixCacheStats
from peftserve.metrics import AdapterMetrics, AdapterSnapshot, AdapterTraffic, ServerMetrics


def snapshot() -> AdapterSnapshot:
    return AdapterSnapshot(
        loads={"host": 7, "device": 9},
        load_failures={"host": 1},
        evictions={"host": 2, "device": 3},
        resident={"disk": 500, "host": 40, "device": 8},
        host_bytes=1234,
        cache_hits=11,
        cache_misses=7,
    )


def test_traffic_top_n_plus_other() -> None:
    traffic = AdapterTraffic()
    for i in range(30):
        for _ in range(30 - i):
            traffic.record(f"acme/a{i}", tokens=2)
    top = traffic.top(3)
    assert top[:3] == [("acme/a0", 30, 60), ("acme/a1", 29, 58), ("acme/a2", 28, 56)]
    assert top[3][0] == "other" and top[3][1] == sum(range(1, 28))
    traffic.forget("acme/a0")
    assert traffic.top(0) == [("other", sum(range(1, 31)), 2 * sum(range(1, 31)))]


class Engine:
    def __init__(self) -> None:
        self.adapter_metrics = AdapterMetrics(snapshot, top_n=2)

    def stats(self) -> EngineStats:
        return EngineStats(waiting=0, running=0, kv_blocks_used=0, kv_blocks_free=1)


def test_exposition_through_server_metrics() -> None:
    engine = Engine()
    engine.adapter_metrics.observe_load("host", 0.02)
    for name in ("acme/x", "acme/y", "acme/z", "acme/x"):
        engine.adapter_metrics.traffic.record(name, tokens=5)
    text = generate_latest(ServerMetrics(engine).registry).decode()
    for line in (
        'peftserve_adapter_loads_total{tier="device"} 9.0',
        'peftserve_adapter_evictions_total{tier="host"} 2.0',
        'peftserve_adapters_resident{tier="disk"} 500.0',
        "peftserve_adapter_cache_hits_total 11.0",
        "peftserve_adapter_cache_misses_total 7.0",
        'peftserve_adapter_load_seconds_count{tier="host"} 1.0',
        'peftserve_adapter_requests_total{adapter="acme/x"} 2.0',
        'peftserve_adapter_requests_total{adapter="other"} 1.0',
        'peftserve_adapter_generated_tokens_total{adapter="acme/x"} 10.0',
    ):
        assert line in text, line
    assert text.count("peftserve_adapter_requests_total{") == 3  # top 2 plus other


class CachingEngine:
    def stats(self) -> EngineStats:
        cache = PrefixCacheStats(enabled=True, query_tokens=400, hit_tokens=300, cached_blocks=7, evictions=2)
        return EngineStats(waiting=0, running=0, kv_blocks_used=3, kv_blocks_free=9, prefix_cache=cache)


def test_prefix_cache_counters_in_the_exposition() -> None:
    text = generate_latest(ServerMetrics(CachingEngine()).registry).decode()
    for line in (
        "peftserve_prefix_cache_query_tokens_total 400.0",
        "peftserve_prefix_cache_hit_tokens_total 300.0",
        "peftserve_prefix_cache_hit_rate 0.75",
        "peftserve_prefix_cache_blocks 7.0",
        "peftserve_prefix_cache_evictions_total 2.0",
    ):
        assert line in text, line
    assert "peftserve_prefix_cache" not in generate_latest(ServerMetrics(Engine()).registry).decode()
