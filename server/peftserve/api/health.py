"""grpc.health.v1 status of the server: NOT_SERVING until the engine can serve, and again while draining."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from peftserve_client._proto import peftserve_pb2

INFERENCE_SERVICE = peftserve_pb2.DESCRIPTOR.services_by_name["Inference"].full_name
SERVICES = ("", INFERENCE_SERVICE)
"""'' is the whole server, as health probes (grpc_health_probe, Kubernetes) ask by default."""


class ServingHealth:
    """Sets the health status of the server and of the Inference service together."""

    def __init__(self) -> None:
        self.servicer = health_aio.HealthServicer()
        self.serving = False
        """What the HTTP health route reports: True between mark_serving and mark_not_serving."""

    async def mark_serving(self) -> None:
        """Report SERVING; call once the engine is created (EngineConfig.warm_up says what is warm then)."""
        await self._set(health_pb2.HealthCheckResponse.SERVING)

    async def mark_not_serving(self) -> None:
        """Report NOT_SERVING: starting up, or draining before shutdown."""
        await self._set(health_pb2.HealthCheckResponse.NOT_SERVING)

    async def _set(self, status: int) -> None:
        self.serving = status == health_pb2.HealthCheckResponse.SERVING
        for service in SERVICES:
            await self.servicer.set(service, status)
