"""ClusterDirectory: a small named Ray actor where replicas announce themselves and admin changes.

The `peftserve cluster` process creates it and flags the drain in it; each ingress replica reports
there once the requests it let in before the drain have finished. Engine replicas register their
process id, node and metrics address (the cluster's /metrics and the tests read them), and poll the
log of adapter changes made through other replicas (uploads, deletes, unloads) so that each replica
applies them within a second.
"""

from __future__ import annotations

from dataclasses import dataclass

import ray

DIRECTORY_NAME = "peftserve-directory"
NAMESPACE = "peftserve"
MAX_EVENTS = 10_000
"""Adapter changes kept; a replica that falls further behind rescans the whole store."""


@dataclass(frozen=True)
class ReplicaInfo:
    """Where one engine replica runs."""

    replica_id: str
    pid: int
    node_ip: str
    metrics_url: str


@dataclass(frozen=True)
class AdapterEvent:
    """An adapter change made through one replica that the others apply."""

    seq: int
    kind: str
    """'changed' (versions added or removed in the store: re-read it) or 'unload' (leave memory)."""
    adapter_id: str


@ray.remote(num_cpus=0)
class ClusterDirectory:
    """Replicas by id, and the adapter changes in order (sequence numbers from 1)."""

    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaInfo] = {}
        self._events: list[AdapterEvent] = []
        self._seq = 0
        self._draining = False
        self._drained: set[str] = set()

    def drain(self) -> None:
        """The cluster is stopping: the ingress answers new requests with UNAVAILABLE."""
        self._draining = True

    def draining(self) -> bool:
        return self._draining

    def ingress_drained(self, ingress_id: str) -> None:
        """An ingress replica refuses new requests and has none left in flight."""
        self._drained.add(ingress_id)

    def drained_ingresses(self) -> int:
        return len(self._drained)

    def register(self, info: ReplicaInfo) -> None:
        self._replicas[info.replica_id] = info

    def unregister(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def replicas(self) -> list[ReplicaInfo]:
        return sorted(self._replicas.values(), key=lambda r: r.replica_id)

    def publish(self, kind: str, adapter_id: str) -> int:
        self._seq += 1
        self._events.append(AdapterEvent(self._seq, kind, adapter_id))
        del self._events[:-MAX_EVENTS]
        return self._seq

    def events_since(self, seq: int) -> tuple[int, list[AdapterEvent] | None]:
        """(latest seq, events after seq); None when some were dropped (the caller rescans)."""
        if self._events and seq < self._events[0].seq - 1:
            return self._seq, None
        return self._seq, [e for e in self._events if e.seq > seq]


def get_directory() -> ray.actor.ActorHandle:
    """The running cluster's directory (the `peftserve cluster` process created it)."""
    return ray.get_actor(DIRECTORY_NAME, namespace=NAMESPACE)
