"""serve() in its own process around a FakeEngine: health, metrics endpoint, SIGTERM drain, exit 0."""

from __future__ import annotations

import signal
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from peftserve.bench.server import ServerProcess, source_env
from peftserve_client import Client, FinishReason, Unavailable

SERVE_FAKE = """
import asyncio
from fake_engine import FakeEngine
from peftserve.api.server import serve
from peftserve.cli import configure_logging
from peftserve.config import ServerConfig

configure_logging("INFO")
asyncio.run(serve(ServerConfig(port=0, metrics_port=0, grace_s=5), lambda _: FakeEngine(token_delay_s=0.02)))
"""


@pytest.fixture
def fake_server() -> Iterator[ServerProcess]:
    server = ServerProcess([sys.executable, "-c", SERVE_FAKE], env=source_env(Path(__file__).parent))
    try:
        yield server
    finally:
        server.stop()


def test_sigterm_drains_in_flight_requests_then_exits_0(fake_server: ServerProcess) -> None:
    address = fake_server.wait_ready(timeout_s=20)
    assert fake_server.metrics_url is not None
    with Client(address, timeout=10) as client:
        assert client.health() == "SERVING"
        stream = client.generate_stream("draining", max_new_tokens=20)
        first = next(stream)
        fake_server.proc.send_signal(signal.SIGTERM)
        chunks = [first, *stream]
        assert chunks[-1].finish_reason is FinishReason.LENGTH and len(chunks) == 20
        with pytest.raises(Unavailable):
            client.generate("too late", max_new_tokens=1)
    assert fake_server.proc.wait(timeout=10) == 0, fake_server.tail()
    assert any("peftserve stopped" in line for line in fake_server.log)


def test_metrics_endpoint_of_serve(fake_server: ServerProcess) -> None:
    address = fake_server.wait_ready(timeout_s=20)
    with Client(address, timeout=10) as client:
        client.generate("abc", max_new_tokens=2)
    assert fake_server.metrics_url is not None
    with urllib.request.urlopen(fake_server.metrics_url, timeout=5) as response:
        body = response.read().decode()
    assert 'peftserve_requests_total{status="OK"} 1.0' in body
    assert "peftserve_running_requests 0.0" in body


SERVE_FAKE_WITH_KEYS = """
import asyncio, sys
from pathlib import Path
from fake_engine import FakeEngine
from peftserve.api.server import serve
from peftserve.auth import KeyRing
from peftserve.cli import configure_logging
from peftserve.config import ServerConfig

configure_logging("INFO")
path = Path(sys.argv[1])
config = ServerConfig(port=0, grace_s=1)
asyncio.run(serve(config, lambda _: FakeEngine(), keys=KeyRing.load(path), keys_file=path))
"""


def test_sighup_reloads_the_keys_file(tmp_path: Path) -> None:
    from peftserve.auth import KeyRing, Scope
    from peftserve_client import Unauthenticated

    keys_file = tmp_path / "keys.json"
    ring, old_key = KeyRing().add("acme", [Scope.INFER])
    ring.save(keys_file)
    server = ServerProcess(
        [sys.executable, "-c", SERVE_FAKE_WITH_KEYS, str(keys_file)], env=source_env(Path(__file__).parent)
    )
    try:
        address = server.wait_ready(timeout_s=20)
        with Client(address, timeout=10, api_key=old_key) as client:
            assert client.generate("hi", max_new_tokens=1).completion_tokens == 1

        keys_file.write_text("{ not json")  # a broken file is refused; the keys in use stay
        server.proc.send_signal(signal.SIGHUP)
        _wait_for_log(server, "not reloaded")
        with Client(address, timeout=10, api_key=old_key) as client:
            assert client.generate("hi", max_new_tokens=1).completion_tokens == 1

        ring, new_key = ring.revoke(ring.entries[0].key_id).add("acme", [Scope.INFER])
        ring.save(keys_file)
        server.proc.send_signal(signal.SIGHUP)
        _wait_for_log(server, "reloaded: 1 keys")
        with Client(address, timeout=10, api_key=new_key) as client:
            assert client.generate("hi", max_new_tokens=1).completion_tokens == 1
        with Client(address, timeout=10, api_key=old_key) as client, pytest.raises(Unauthenticated):
            client.generate("hi", max_new_tokens=1)
    finally:
        server.stop()


def _wait_for_log(server: ServerProcess, text: str, timeout_s: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while not any(text in line for line in server.log):
        assert time.monotonic() < deadline, f"no log line with {text!r}:\n{server.tail()}"
        time.sleep(0.05)


SERVE_REPORTING_FROZEN = """
import asyncio, gc, logging
from fake_engine import FakeEngine
from peftserve.api.server import serve
from peftserve.cli import configure_logging
from peftserve.config import ServerConfig

class Engine(FakeEngine):
    async def drain(self, grace_s):
        logging.getLogger("test").info("frozen objects: %d", gc.get_freeze_count())
        await super().drain(grace_s)

configure_logging("INFO")
asyncio.run(serve(ServerConfig(port=0, grace_s=1), lambda _: Engine()))
"""


def test_serve_freezes_the_startup_heap() -> None:
    """Full garbage collections skip what startup built: they stall the engine and the loop for less."""
    server = ServerProcess(
        [sys.executable, "-c", SERVE_REPORTING_FROZEN], env=source_env(Path(__file__).parent)
    )
    try:
        server.wait_ready(timeout_s=20)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=10) == 0, server.tail()
    finally:
        server.stop()
    (line,) = [line for line in server.log if "frozen objects:" in line]
    assert int(line.rsplit(":", 1)[1]) > 10_000  # the modules imported, at least


def test_the_heap_is_frozen_again_once_the_background_warm_up_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the warm-up builds beside the steps (the compile's objects) is frozen too, once it has ended."""
    import gc
    import threading
    import time

    from peftserve.api import server

    monkeypatch.setattr(server, "WARM_UP_POLL_S", 0.01)
    warming = [1]
    gc.unfreeze()
    try:
        server.freeze_startup_heap(lambda: warming[0])
        frozen = gc.get_freeze_count()
        built = [[] for _ in range(5_000)]  # what the warm-up leaves
        time.sleep(0.1)
        # not while it runs (the count may fall meanwhile: other threads of this process free objects)
        during = gc.get_freeze_count()
        assert during < frozen + len(built)
        warming[0] = 0
        (thread,) = [t for t in threading.enumerate() if t.name == "peftserve-freeze-after-warm-up"]
        thread.join(timeout=5)
        assert not thread.is_alive() and gc.get_freeze_count() >= during + len(built) // 2  # frozen now
    finally:
        gc.unfreeze()
