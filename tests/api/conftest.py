"""Real gRPC and HTTP servers on port 0 around a FakeEngine and a FakeAdmin, on their own loop thread."""

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
from peftserve.api.http import HttpServer, create_app
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
    http: HttpServer
    """The OpenAI-compatible HTTP API on the same engine, admin, keys, health and metrics."""
    api_keys: dict[str, str] = field(default_factory=dict)
    """Key of each KEYS name (keyed server only)."""

    @property
    def base_url(self) -> str:
        """What the openai client takes as base_url."""
        return f"{self.http.url}/v1"

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
        health, metrics, auth = ServingHealth(), ServerMetrics(engine), Authenticator(keys)
        server, port = await create_server(
            engine,
            ServerConfig(port=0),
            health=health,
            metrics=metrics,
            admin=admin,
            auth=auth,
        )
        await server.start()
        app = create_app(
            engine, health=health, metrics=metrics, auth=auth, admin=admin, max_upload_bytes=UPLOAD_LIMIT
        )
        http = HttpServer(app, "127.0.0.1", 0, grace_s=1)
        await http.start()
        return Served(f"127.0.0.1:{port}", engine, admin, health, metrics, server, loop, http)

    s = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield s
    finally:
        s.call(s.server.stop(None))
        s.call(s.http.stop())
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
    ring, api_keys = _keyed_ring()
    with serving(ring) as s:
        s.api_keys = api_keys
        yield s


def _keyed_ring() -> tuple[KeyRing, dict[str, str]]:
    ring, api_keys = KeyRing(), {}
    for name, (tenant, scopes) in KEYS.items():
        ring, api_keys[name] = ring.add(tenant, scopes)
    return ring, api_keys


@pytest.fixture(scope="module")
def shared_local() -> Iterator[Served]:
    """One local-mode server for a whole module (use `local`, which resets its fakes per test)."""
    with serving() as s:
        yield s


@pytest.fixture(scope="module")
def shared_keyed() -> Iterator[Served]:
    """One server with the KEYS for a whole module (use `with_keys`, which resets its fakes per test)."""
    ring, api_keys = _keyed_ring()
    with serving(ring) as s:
        s.api_keys = api_keys
        yield s


def _reset(s: Served) -> Served:
    """The shared server's fakes as new: knobs off, nothing recorded, no adapters stored; serving."""
    type(s.engine).__init__(s.engine)
    type(s.admin).__init__(s.admin)
    s.call(s.health.mark_serving())
    return s


@pytest.fixture
def local(shared_local: Served) -> Served:
    return _reset(shared_local)


@pytest.fixture
def with_keys(shared_keyed: Served) -> Served:
    return _reset(shared_keyed)
