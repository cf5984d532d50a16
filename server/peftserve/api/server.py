"""Build the gRPC server (create_server) and run it, with the optional HTTP server, for the life of the
process (serve)."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from peftserve.api.admin_servicer import AdminServicer
from peftserve.api.decoding import add_guarded
from peftserve.api.health import INFERENCE_SERVICE, ServingHealth
from peftserve.api.http import HttpServer, create_app
from peftserve.api.servicer import InferenceServicer
from peftserve.api.tls import ServerTls
from peftserve.auth import Authenticator, KeyRing
from peftserve.config import EngineConfig, ServerConfig
from peftserve.engine.protocol import AdapterAdmin, EngineClient
from peftserve.errors import InvalidRequest
from peftserve.metrics import ServerMetrics, start_metrics_server
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client._proto import peftserve_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

EngineFactory = Callable[[EngineConfig], EngineClient]
"""Builds a loaded engine; it blocks (model load), so serve() runs it in a thread."""

ADAPTERS_SERVICE = pb.DESCRIPTOR.services_by_name["Adapters"].full_name


async def create_server(
    engine: EngineClient,
    config: ServerConfig,
    *,
    health: ServingHealth | None = None,
    metrics: ServerMetrics | None = None,
    admin: AdapterAdmin | None = None,
    auth: Authenticator | None = None,
    tls: ServerTls | None = None,
) -> tuple[grpc.aio.Server, int]:
    """A bound, not yet started server and its port.

    It serves Inference, Adapters (when there is an admin), health (NOT_SERVING) and reflection.
    With an authenticator holding keys, Inference and Adapters need an API key; without one, every
    caller is the local tenant. Health and reflection are always open. With tls, only over TLS.
    """
    server = grpc.aio.server()
    auth = auth if auth is not None else Authenticator()
    add_guarded(pb_grpc.add_InferenceServicer_to_server, InferenceServicer(engine, metrics, auth), server)
    services = [INFERENCE_SERVICE]
    if admin is not None:
        admin_servicer = AdminServicer(admin, auth)
        add_guarded(pb_grpc.add_AdaptersServicer_to_server, admin_servicer, server)
        services.append(ADAPTERS_SERVICE)
    health = health if health is not None else ServingHealth()
    await health.mark_not_serving()
    health_pb2_grpc.add_HealthServicer_to_server(health.servicer, server)
    services += [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(services, server)
    address = f"{config.host}:{config.port}"
    port = (
        server.add_secure_port(address, tls.grpc_credentials()) if tls else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    return server, port


def load_engine(config: EngineConfig) -> EngineClient:
    """The real engine, loaded and ready (imports torch)."""
    from peftserve.engine.async_engine import AsyncEngine

    return AsyncEngine.create(config)


def freeze_startup_heap(warming: Callable[[], int] | None = None) -> None:
    """Keep what startup built (modules, model, tokenizer: ~400k objects) out of the garbage collector's
    oldest generation, as vLLM's server does: a full collection then takes ~1 ms instead of ~200 ms,
    during which it holds the GIL, and so stalls the engine thread and the event loop alike.

    warming: the warm-up work the engine still runs beside its steps (EngineStats.warming). While there
    is some, a daemon thread waits for its end and freezes again: the compile leaves its own objects
    (bench-1b: ~110k, a full collection over them 44 ms)."""
    gc.collect()
    gc.freeze()
    if warming is not None and warming():

        def again() -> None:
            while warming():
                time.sleep(WARM_UP_POLL_S)
            gc.collect()
            gc.freeze()
            logger.debug("froze the heap again after the warm-up: %d objects", gc.get_freeze_count())

        threading.Thread(target=again, name="peftserve-freeze-after-warm-up", daemon=True).start()


STOP_LINGER_S = 0.5
"""How long a draining server still answers, UNAVAILABLE, once its last request has ended, before gRPC
stops: gRPC cancels a call that arrives while it stops (grpc/grpc#41785), so a client that sent one
just then would be told CANCELLED, where UNAVAILABLE says to try another replica."""
WARM_UP_POLL_S = 0.5
"""How often freeze_startup_heap's thread looks whether the warm-up has ended."""


async def serve(
    config: ServerConfig,
    engine_factory: EngineFactory = load_engine,
    *,
    keys: KeyRing | None = None,
    keys_file: Path | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain the engine and stop gracefully.

    keys: the API keys (None: local mode). keys_file: where they came from. SIGHUP re-reads the keys
    file and the TLS files, so keys added or revoked with `peftserve keys` and renewed certificates
    take effect without a restart. config.http_port adds the OpenAI-compatible HTTP API on the same
    engine, keys, metrics and health. TLS files are checked before the model loads (ValueError).
    """
    tls = ServerTls(config.tls) if config.tls is not None else None
    loop = asyncio.get_running_loop()
    engine = await loop.run_in_executor(None, engine_factory, config.engine)
    metrics = ServerMetrics(engine)
    if config.metrics_port is not None:
        http = start_metrics_server(config.metrics_port, metrics.registry, host=config.host, tls=config.tls)
        if tls is not None:
            tls.follow(http.socket.context)
        scheme = "https" if tls is not None else "http"
        logger.info("metrics on %s://%s:%d/metrics", scheme, config.host, http.server_port)
    health = ServingHealth()
    auth = Authenticator(keys)
    server, port = await create_server(
        engine,
        config,
        health=health,
        metrics=metrics,
        admin=engine.admin,
        auth=auth,
        tls=tls,
    )
    await server.start()
    http_server = None
    if config.http_port is not None:
        http_server = await start_http(config, engine, health, metrics, auth, tls)
    if keys_file is not None or tls is not None:
        loop.add_signal_handler(signal.SIGHUP, reload, auth if keys_file else None, keys_file, tls)

    stopping = asyncio.Event()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stopping.set)
    freeze_startup_heap(lambda: engine.stats().warming)
    await health.mark_serving()
    if keys is None:
        logger.info("no keys file: single-tenant local mode (every caller is tenant 'default')")
    else:
        logger.info("API keys required: %d keys", len(keys.entries))
    if tls is not None:
        logger.info("TLS on every listener%s", " with client certificates (mutual TLS)" if tls.mutual else "")
    logger.info("peftserve serving %s on %s:%d", engine.model_info.model_id, config.host, port)

    await stopping.wait()
    for sig in signals:  # a second signal gets the default behaviour: exit now
        loop.remove_signal_handler(sig)
    logger.info("draining: up to %.1f s for in-flight requests", config.grace_s)
    await health.mark_not_serving()
    await engine.drain(config.grace_s)
    await asyncio.sleep(min(STOP_LINGER_S, config.grace_s))
    await server.stop(config.grace_s)
    if http_server is not None:
        await http_server.stop()
    await loop.run_in_executor(None, engine.shutdown)
    logger.info("peftserve stopped")


async def start_http(
    config: ServerConfig,
    engine: EngineClient,
    health: ServingHealth,
    metrics: ServerMetrics,
    auth: Authenticator,
    tls: ServerTls | None,
) -> HttpServer:
    """The OpenAI-compatible HTTP API on config.http_port, started."""
    app = create_app(
        engine,
        health=health,
        metrics=metrics,
        auth=auth,
        admin=engine.admin,
        max_upload_bytes=config.engine.max_upload_bytes,
    )
    ssl_context = tls.ssl_context() if tls is not None else None
    http_server = HttpServer(app, config.host, config.http_port or 0, ssl_context, grace_s=config.grace_s)
    await http_server.start()
    logger.info("OpenAI-compatible HTTP API on %s/v1", http_server.url)
    return http_server


def reload(auth: Authenticator | None, keys_file: Path | None, tls: ServerTls | None) -> None:
    """SIGHUP: re-read the keys file and the TLS files; whatever does not load is logged and kept."""
    if auth is not None and keys_file is not None:
        reload_keys(auth, keys_file)
    if tls is not None:
        try:
            tls.reload()
        except ValueError as exc:
            logger.error("TLS files not reloaded (%s); keeping the certificates in use", exc)
            return
        logger.info("TLS files reloaded: %s", tls.config.cert_file)


def reload_keys(auth: Authenticator, keys_file: Path) -> None:
    """Re-read the keys file into auth; a file that does not load is logged and the old keys stay."""
    in_use = auth.keys
    try:
        keys = KeyRing.load(keys_file)
    except InvalidRequest as exc:  # unreadable, missing or malformed: load says which
        kept = len(in_use.entries) if in_use else 0
        logger.error("keys file %s not reloaded (%s); keeping the %d keys in use", keys_file, exc, kept)
        return
    auth.replace_keys(keys)
    logger.info("keys file %s reloaded: %d keys", keys_file, len(keys.entries))
