"""The OpenAI-compatible HTTP API as one FastAPI app over the same engine, keys and metrics as gRPC."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from peftserve import __version__
from peftserve.api.health import ServingHealth
from peftserve.api.http.admin import admin_router
from peftserve.api.http.errors import install_error_handlers
from peftserve.api.http.front import HttpFront
from peftserve.api.http.inference import inference_router
from peftserve.auth import Authenticator
from peftserve.engine.protocol import AdapterAdmin, EngineClient
from peftserve.metrics import ServerMetrics
from peftserve.store.staging import MAX_UPLOAD_BYTES

MAX_REQUEST_BYTES = 4 << 20
"""Largest request body outside uploads: gRPC's default receive limit (413 beyond it)."""


def create_app(
    engine: EngineClient,
    *,
    health: ServingHealth,
    metrics: ServerMetrics,
    auth: Authenticator,
    admin: AdapterAdmin | None = None,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    metrics_registry: CollectorRegistry | None = None,
) -> FastAPI:
    """The app: /v1 inference routes, /v1/adapters when there is an admin, /health and /metrics.

    /health answers 200 while the server serves and 503 while it starts or drains, as the gRPC health
    service does; /health and /metrics need no key, like the gRPC health service and --metrics-port.
    /metrics serves metrics_registry when given (a cluster's ingress: its replicas' metrics), else
    metrics.registry.
    """
    exposed = metrics_registry if metrics_registry is not None else metrics.registry
    front = HttpFront(engine, auth, metrics, health, admin, max_upload_bytes)
    app = FastAPI(
        title="peftserve",
        summary="OpenAI-compatible API: one base model, many adapters",
        version=__version__,
        max_body_size=MAX_REQUEST_BYTES,
        redoc_url=None,
    )
    install_error_handlers(app)
    app.include_router(inference_router(front))
    if admin is not None:
        app.include_router(admin_router(front, admin))

    @app.get("/health", tags=["operations"])
    async def check_health() -> JSONResponse:
        serving = health.serving
        return JSONResponse({"status": "SERVING" if serving else "NOT_SERVING"}, 200 if serving else 503)

    @app.get("/metrics", tags=["operations"])
    def prometheus_metrics() -> Response:  # a plain def runs on a worker thread: collecting may block
        return Response(generate_latest(exposed), media_type=CONTENT_TYPE_LATEST)

    return app
