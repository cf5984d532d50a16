"""`peftserve serve` on the embedded default model, as a subprocess: health, generate, SIGTERM drain."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from peftserve.bench.server import ServerProcess
from peftserve_client import Client, FinishReason, PeftServeError, Unavailable

pytestmark = pytest.mark.slow

STARTUP_TIMEOUT_S = 240


@pytest.fixture
def real_server() -> Iterator[ServerProcess]:
    server = ServerProcess.serve(["--grace-s", "10", "--kv-cache-mb", "64"])
    try:
        yield server
    finally:
        server.stop()


def test_serve_health_generate_and_drain_on_sigterm(real_server: ServerProcess) -> None:
    address = real_server.wait_ready(STARTUP_TIMEOUT_S)
    with Client(address, timeout=60) as client:
        assert client.health() == "SERVING"
        assert client.model_info().model_id == "default"
        result = client.generate("Hello", max_new_tokens=4)
        assert result.completion_tokens == len(result.token_ids) > 0
        assert result.finish_reason in (FinishReason.LENGTH, FinishReason.EOS)

        stream = client.generate_stream("Once upon a time", max_new_tokens=64, ignore_eos=True)
        first = next(stream)
        real_server.proc.send_signal(signal.SIGTERM)
        chunks = [first, *stream]  # the in-flight request finishes (or is cancelled) within the grace period
        assert chunks[-1].finish_reason in (FinishReason.LENGTH, FinishReason.CANCELLED)

        with pytest.raises(PeftServeError) as refused:
            client.generate("too late", max_new_tokens=1, timeout=5)
        assert isinstance(refused.value, Unavailable), refused.value

    assert real_server.proc.wait(timeout=30) == 0, real_server.tail()
    assert any("peftserve stopped" in line for line in real_server.log)
