"""The Ray Serve ingress: Ray's gRPC proxy calls its methods by RPC name (Inference, Adapters, Health);
Ray's HTTP proxy calls its ASGI app, the OpenAI-compatible HTTP API of one server.

Both run the same code as one server (servicers, routes) over the remote engine (remote.py). gRPC
errors end the call through Ray's gRPC context with peftserve's own status codes and messages; HTTP
errors are the app's own responses, which Ray's proxy passes through unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from ray import serve
from ray.actor import ActorHandle
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from peftserve.api.admin_servicer import AdminServicer
from peftserve.api.health import INFERENCE_SERVICE, ServingHealth
from peftserve.api.http import create_app
from peftserve.api.server import ADAPTERS_SERVICE
from peftserve.api.servicer import InferenceServicer
from peftserve.auth import Authenticator, KeyRing
from peftserve.config import EngineConfig
from peftserve.deploy.directory import get_directory
from peftserve.deploy.federation import cluster_registry
from peftserve.deploy.remote import RemoteEngine
from peftserve.deploy.routing import VersionPins
from peftserve.errors import Unavailable
from peftserve.metrics import ServerMetrics
from peftserve.store import AdapterStore
from peftserve_client._proto import peftserve_pb2 as pb

DRAIN_POLL_S = 0.5
IDLE_POLL_S = 0.05
HEALTH_TIMEOUT_S = 5.0
"""A health check answers NOT_SERVING when no replica answers within this."""
SERVICES = ("", INFERENCE_SERVICE, ADAPTERS_SERVICE)
Response = TypeVar("Response")


class Aborted(Exception):
    """Raised by RayContext.abort: the status is on Ray's context, the proxy sends it."""


class RayContext:
    """What the servicers use of grpc.aio.ServicerContext, over the context Ray's proxy passes."""

    def __init__(self, context: RayServegRPCContext) -> None:
        self._context = context

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return self._context.invocation_metadata()

    def set_trailing_metadata(self, metadata: Any) -> None:
        self._context.set_trailing_metadata(list(metadata))

    def time_remaining(self) -> float | None:
        return None  # Ray's context does not carry the deadline; an expired call is cancelled by the proxy

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise Aborted(details)


async def _unary(
    method: Callable[[Any, RayContext], Awaitable[Response]],
    request: Any,
    context: RayServegRPCContext,
    empty: Callable[[], Response],
) -> Response:
    """A unary RPC's response; after an abort an empty one, which carries the status (and trailing
    metadata such as retry-after) set on Ray's context: the proxy applies both (a raise loses trailers)."""
    try:
        return await method(request, RayContext(context))
    except Aborted:
        return empty()


@serve.ingress()
class Ingress:
    """Ray Serve deployment: authenticates, pins versions and routes; holds the tokenizer, no model."""

    async def __init__(self, replicas: DeploymentHandle, keys: KeyRing | None, engine: EngineConfig) -> None:
        store = None
        if engine.store is not None:  # shared with the replicas: opened without cleaning it
            store = AdapterStore(
                engine.store, engine.max_adapters_per_tenant, engine.max_upload_bytes, clean=False
            )
        self._engine = await RemoteEngine.connect(replicas, VersionPins(store), store, engine.model)
        self._auth = Authenticator(keys)
        self._metrics = ServerMetrics()
        """What the fronts record here stays here: the replicas count the requests they run."""
        self._max_upload_bytes = engine.max_upload_bytes
        self._inference = InferenceServicer(self._engine, self._metrics, self._auth)  # type: ignore[arg-type]
        self._admin = AdminServicer(self._engine.admin, self._auth)  # type: ignore[arg-type]
        self._directory = get_directory()
        self._health = ServingHealth()
        await self._health.mark_serving()  # a replica answered: connect() asked it for the model
        self._watch = asyncio.get_running_loop().create_task(self._watch_drain(self._directory))

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The HTTP API Ray's HTTP proxy serves (Ray calls this after the constructor)."""
        return create_app(
            self._engine,  # type: ignore[arg-type]
            health=self._health,
            metrics=self._metrics,
            auth=self._auth,
            admin=self._engine.admin,  # type: ignore[arg-type]
            max_upload_bytes=self._max_upload_bytes,
            metrics_registry=cluster_registry(self._directory),
        )

    async def _watch_drain(self, directory: ActorHandle) -> None:
        """Turn to draining when the cluster process flags it (SIGTERM); report once requests let in
        before have finished, so the cluster process stops Serve only then."""
        while not self._engine.draining:
            await asyncio.sleep(DRAIN_POLL_S)
            with contextlib.suppress(Exception):  # the directory is gone only when the cluster is
                self._engine.draining = await directory.draining.remote()
        await self._health.mark_not_serving()
        while self._engine.in_flight:
            await asyncio.sleep(IDLE_POLL_S)
        with contextlib.suppress(Exception):  # the cluster process then stops Serve at --grace-s
            await directory.ingress_drained.remote(serve.get_replica_context().replica_id.unique_id)

    # -- peftserve.v1.Inference ---------------------------------------------------------------

    async def Generate(self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._inference.Generate, request, grpc_context, pb.GenerateResponse)

    async def GenerateStream(
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for message in self._inference.GenerateStream(request, RayContext(grpc_context)):
            yield message

    async def Tokenize(self, request: pb.TokenizeRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._inference.Tokenize, request, grpc_context, pb.TokenizeResponse)

    async def ModelInfo(self, request: pb.ModelInfoRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._inference.ModelInfo, request, grpc_context, pb.ModelInfoResponse)

    # -- peftserve.v1.Adapters ----------------------------------------------------------------

    async def UploadAdapter(self, request_stream: Any, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._admin.UploadAdapter, request_stream, grpc_context, pb.AdapterManifest)

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._admin.LoadAdapter, request, grpc_context, pb.AdapterStatus)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._admin.UnloadAdapter, request, grpc_context, pb.AdapterStatus)

    async def DeleteAdapter(self, request: pb.DeleteAdapterRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._admin.DeleteAdapter, request, grpc_context, pb.DeleteAdapterResponse)

    async def ListAdapters(self, request: pb.ListAdaptersRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._admin.ListAdapters, request, grpc_context, pb.ListAdaptersResponse)

    async def GetAdapter(self, request: pb.GetAdapterRequest, grpc_context: RayServegRPCContext) -> Any:
        return await _unary(self._admin.GetAdapter, request, grpc_context, pb.AdapterStatus)

    # -- grpc.health.v1.Health ----------------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        """SERVING while some replica answers; open to every caller, as on one server."""
        status = health_pb2.HealthCheckResponse
        if request.service not in SERVICES:
            message = f"unknown service {request.service!r}"
            await RayContext(grpc_context).abort(grpc.StatusCode.NOT_FOUND, message)
        if self._engine.draining:
            return status(status=status.NOT_SERVING)
        try:
            await asyncio.wait_for(self._engine.ready(), HEALTH_TIMEOUT_S)
        except (asyncio.TimeoutError, Unavailable):
            return status(status=status.NOT_SERVING)
        return status(status=status.SERVING)
