"""serve() with --http-port in its own process (FakeEngine): SIGTERM drains HTTP streams too."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import httpx2

from peftserve.bench.server import ServerProcess, source_env

SERVE_HTTP = """
import asyncio
from fake_engine import FakeEngine
from peftserve.api.server import serve
from peftserve.cli import configure_logging
from peftserve.config import ServerConfig

configure_logging("INFO")
asyncio.run(serve(ServerConfig(port=0, http_port=0, grace_s=5), lambda _: FakeEngine(token_delay_s=0.02)))
"""


def test_sigterm_lets_http_streams_finish_refuses_new_requests_and_exits_0() -> None:
    server = ServerProcess([sys.executable, "-c", SERVE_HTTP], env=source_env(Path(__file__).parent))
    try:
        server.wait_ready(timeout_s=20)
        assert server.http_url is not None and server.http_url.startswith("http://")
        body = {"model": "fake", "prompt": "draining", "max_tokens": 20, "stream": True}
        with httpx2.Client(base_url=server.http_url, timeout=10) as http:
            assert http.get("/health").json() == {"status": "SERVING"}
            with http.stream("POST", "/v1/completions", json=body) as stream:
                lines = (line for line in stream.iter_lines() if line.startswith("data: "))
                first = next(lines)
                server.proc.send_signal(signal.SIGTERM)
                with httpx2.Client(base_url=server.http_url, timeout=10) as other:
                    refused = other.post("/v1/completions", json={**body, "stream": False})
                    health = other.get("/health")
                rest = list(lines)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        assert health.status_code == 503
        chunks = [json.loads(line.removeprefix("data: ")) for line in [first, *rest[:-1]]]
        assert rest[-1] == "data: [DONE]" and len(chunks) == 20
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert server.proc.wait(timeout=15) == 0, server.tail()
        assert any("peftserve stopped" in line for line in server.log)
    finally:
        server.stop()
