"""ClusterConfig: a `peftserve cluster` deployment, frozen and validated (plain Python)."""

from __future__ import annotations

from dataclasses import dataclass, field

from peftserve.config import ServerConfig
from peftserve.errors import InvalidRequest

APP_NAME = "peftserve"
"""The Ray Serve application: the only one on its Serve instance, so clients need no `application`."""


@dataclass(frozen=True)
class ClusterConfig:
    """N engine replicas behind Ray Serve's gRPC and HTTP proxies, one shared adapter store."""

    server: ServerConfig = field(default_factory=ServerConfig)
    """gRPC port, metrics port, drain grace and the engine of every replica."""
    replicas: int = 2
    """Engine replicas (each loads the base model once)."""
    ray_address: str | None = None
    """An existing Ray cluster ('auto', 'ray://host:10001' ...); None starts a local one."""
    http_port: int = 8000
    """Ray Serve's HTTP proxy (serve's --http-port; a free port when unset): the OpenAI-compatible API,
    and Ray's own /-/healthz and /-/routes."""
    replica_cpus: float = 1.0
    """CPUs Ray reserves for each replica (match --threads on CPU)."""
    replica_gpus: float = 0.0
    """GPUs Ray reserves for each replica (1 with --device cuda)."""
    max_ongoing_requests: int | None = None
    """Requests Ray lets into one replica at once; None: twice --max-running, so continuous batching
    always has the next requests waiting in the engine's own queue."""
    ingress_replicas: int = 1
    """Replicas of the ingress (auth, version pins, routing): light, no model, no CPU reserved."""
    store_sync_s: float = 5.0
    """Each replica rescans the shared store this often (versions pruned or deleted elsewhere)."""

    def __post_init__(self) -> None:
        for name in ("replicas", "ingress_replicas", "store_sync_s"):
            if getattr(self, name) <= 0:
                raise InvalidRequest(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("replica_cpus", "replica_gpus"):
            if getattr(self, name) < 0:
                raise InvalidRequest(f"{name} must be >= 0, got {getattr(self, name)}")
        limit = self.max_ongoing_requests
        if limit is not None and limit < self.server.engine.max_running:
            raise InvalidRequest(
                f"max_ongoing_requests ({self.max_ongoing_requests}) must be at least --max-running"
                f" ({self.server.engine.max_running}), or batches never fill"
            )

    @property
    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or 2 * self.server.engine.max_running
