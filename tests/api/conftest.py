"""A real gRPC server on port 0 around a FakeEngine and a FakeAdmin, on its own event loop thread."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import pytest

from peftserve.api.health import ServingHealth
from peftserve.api.server import create_server
from peftserve.auth import Authenticator, KeyRing, Scope
from peftserve.config import ServerConfig
from peftserve.metrics import ServerMetrics

from .fake_admin import FakeAdmin
from .fake_engine import FakeEngine

T = TypeVar("T")

UPLOAD_LIMIT = 16 * 1024
"""The test servers' cap on one upload's bytes (the fake admin enforces it as the store does)."""

KEYS = {
    # name: (tenant, scopes)
    "acme": ("acme", {Scope.INFER, Scope.ADMIN}),
    "globex": ("globex", {Scope.INFER, Scope.ADMIN}),
    "acme-infer": ("acme", {Scope.INFER}),
    "acme-admin": ("acme", {Scope.ADMIN}),
}
"""The keys of the `keyed` server."""


@dataclass
class Served:
    """A started server and the handles tests poke at."""

    address: str
    engine: FakeEngine
    admin: FakeAdmin
    health: ServingHealth
    metrics: ServerMetrics
    server: grpc.aio.Server
    loop: asyncio.AbstractEventLoop
    api_keys: dict[str, str] = field(default_factory=dict)
    """Key of each KEYS name (keyed server only)."""

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)


@contextlib.contextmanager
def serving(keys: KeyRing | None = None) -> Iterator[Served]:
    """A started server (local mode without keys) that is stopped on exit."""
    engine, admin = FakeEngine(), FakeAdmin(max_upload_bytes=UPLOAD_LIMIT)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-server", daemon=True)
    thread.start()

    async def start() -> Served:
        health, metrics = ServingHealth(), ServerMetrics(engine)
        server, port = await create_server(
            engine,
            ServerConfig(port=0),
            health=health,
            metrics=metrics,
            admin=admin,
            auth=Authenticator(keys),
        )
        await server.start()
        return Served(f"127.0.0.1:{port}", engine, admin, health, metrics, server, loop)

    s = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield s
    finally:
        s.call(s.server.stop(None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


@pytest.fixture
def served() -> Iterator[Served]:
    """A server in single-tenant local mode."""
    with serving() as s:
        yield s


@pytest.fixture
def keyed() -> Iterator[Served]:
    """A server that needs API keys: those of KEYS, in served.api_keys."""
    ring, api_keys = KeyRing(), {}
    for name, (tenant, scopes) in KEYS.items():
        ring, api_keys[name] = ring.add(tenant, scopes)
    with serving(ring) as s:
        s.api_keys = api_keys
        yield s
