"""One Prometheus endpoint for the cluster: every replica's metrics with a `replica` label, plus the
routing's adapter-affinity hit rate over all replicas."""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterator, Sequence

import ray
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from peftserve.deploy.directory import ReplicaInfo

log = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0
DIRECTORY_TIMEOUT_S = 10.0
ROUTED = "peftserve_routed_requests"


def affinity_rate(families: Sequence[Metric]) -> float | None:
    """Routed requests that found their adapter id held by their replica, over all routed (None if none)."""
    hits = total = 0.0
    for family in families:
        if family.name != ROUTED:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                total += sample.value
                hits += sample.value if sample.labels.get("affinity") == "hit" else 0.0
    return hits / total if total else None


def scrape(url: str) -> list[Metric]:
    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as response:
        return list(text_string_to_metric_families(response.read().decode()))


class ReplicaMetrics(Collector):
    """Scrapes the replicas the directory lists at collect time; a replica that does not answer is skipped."""

    def __init__(self, replicas: Callable[[], list[ReplicaInfo]]) -> None:
        self._replicas = replicas

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        every: list[Metric] = []
        for info in self._replicas():
            try:
                families = scrape(info.metrics_url)
            except OSError as exc:  # stopped or replaced: the directory lists it until it is cleaned
                log.debug("replica %s did not answer a scrape: %s", info.replica_id, exc)
                continue
            every += families
            for family in families:
                out = merged.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                for s in family.samples:
                    out.add_sample(s.name, {**s.labels, "replica": info.replica_id}, s.value, s.timestamp)
        yield from merged.values()
        rate = affinity_rate(every)
        if rate is not None:
            yield GaugeMetricFamily(
                "peftserve_routing_affinity_ratio",
                "Requests routed to a replica that already held their adapter id, over all routed requests.",
                rate,
            )


def cluster_registry(directory: ray.actor.ActorHandle) -> CollectorRegistry:
    """The cluster's metrics: every replica the directory lists, scraped when collected (which blocks:
    collect off an event loop)."""
    registry = CollectorRegistry()
    registry.register(
        ReplicaMetrics(lambda: ray.get(directory.replicas.remote(), timeout=DIRECTORY_TIMEOUT_S))
    )
    return registry
