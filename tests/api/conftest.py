"""A real gRPC server on port 0 around a FakeEngine, running on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import pytest

from peftserve.api.health import ServingHealth
from peftserve.api.server import create_server
from peftserve.config import ServerConfig
from peftserve.metrics import ServerMetrics

from .fake_engine import FakeEngine

T = TypeVar("T")


@dataclass
class Served:
    """A started server and the handles tests poke at."""

    address: str
    engine: FakeEngine
    health: ServingHealth
    metrics: ServerMetrics
    server: grpc.aio.Server
    loop: asyncio.AbstractEventLoop

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run coro on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=10)


@pytest.fixture
def served() -> Iterator[Served]:
    engine = FakeEngine()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-server", daemon=True)
    thread.start()

    async def start() -> Served:
        health, metrics = ServingHealth(), ServerMetrics(engine)
        server, port = await create_server(engine, ServerConfig(port=0), health=health, metrics=metrics)
        await server.start()
        return Served(f"127.0.0.1:{port}", engine, health, metrics, server, loop)

    s = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield s
    finally:
        s.call(s.server.stop(None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()
