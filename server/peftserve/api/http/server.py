"""uvicorn serving the HTTP app inside serve()'s event loop, beside the gRPC server."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

logger = logging.getLogger(__name__)


def _bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (0 picks a free port); OSError when it cannot be had."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _EmbeddedServer(uvicorn.Server):
    """uvicorn that leaves signals to serve(), which drains gRPC and HTTP together."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    """A bound HTTP(S) listener: start() serves in the running loop, stop() drains connections."""

    def __init__(
        self,
        app: FastAPI,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        grace_s: float = 30.0,
    ) -> None:
        factory: Callable[..., ssl.SSLContext] | None = None
        if ssl_context is not None:
            factory = lambda config, default: ssl_context  # noqa: E731 - the listening context of ServerTls
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            http="httptools",  # not h11: its parsing and writes run on the event loop the engine shares
            lifespan="off",
            log_config=None,
            access_log=False,
            server_header=False,
            ssl_context_factory=factory,
            timeout_graceful_shutdown=grace_s,
        )
        self._server = _EmbeddedServer(config)
        self._socket = _bind(host, port)
        self.port: int = self._socket.getsockname()[1]
        self.tls = ssl_context is not None
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = self._server.config.host
        shown = f"[{host}]" if ":" in host else host
        return f"{'https' if self.tls else 'http'}://{shown}:{self.port}"

    async def start(self) -> None:
        """Accept connections; returns once the listener is up."""
        self._task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="peftserve-http")
        while not self._server.started:
            if self._task.done():
                await self._task  # it failed to start: raise why
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let open responses finish (up to the grace period), then close."""
        if self._task is None:
            return
        self._server.should_exit = True
        await self._task
