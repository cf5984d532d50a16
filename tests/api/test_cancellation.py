"""A cancelled stream or a passed deadline closes the engine's stream, so the engine aborts the request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from peftserve_client import AsyncClient, Client, DeadlineExceeded

from .conftest import Served


def _wait_for(condition: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def _requests(served: Served, status: str) -> float | None:
    return served.metrics.registry.get_sample_value("peftserve_requests_total", {"status": status})


def test_leaving_a_sync_stream_early_aborts_the_request(served: Served) -> None:
    served.engine.token_delay_s = 0.02
    with Client(served.address, timeout=10) as client:
        stream = client.generate_stream("abcdef", max_new_tokens=60, request_id="early-exit")
        assert next(stream).text == "a"
        stream.close()
    assert _wait_for(lambda: "early-exit" in served.engine.aborted), served.engine.aborted
    assert _wait_for(lambda: served.engine.running == 0)


def test_cancelling_an_async_stream_aborts_the_request(served: Served) -> None:
    served.engine.token_delay_s = 0.02

    async def main() -> None:
        async with AsyncClient(served.address, timeout=10) as client:

            async def consume() -> None:
                async for _ in client.generate_stream("abc", max_new_tokens=60, request_id="cancelled"):
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.2)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    assert _wait_for(lambda: "cancelled" in served.engine.aborted), served.engine.aborted
    assert _wait_for(lambda: _requests(served, "CANCELLED") == 1)


@pytest.mark.parametrize("streaming", [False, True])
def test_deadline_is_deadline_exceeded_and_aborts(served: Served, streaming: bool) -> None:
    served.engine.token_delay_s = 0.05
    with Client(served.address) as client, pytest.raises(DeadlineExceeded):
        if streaming:
            list(client.generate_stream("abc", max_new_tokens=60, request_id="late", timeout=0.3))
        else:
            client.generate("abc", max_new_tokens=60, request_id="late", timeout=0.3)
    assert _wait_for(lambda: "late" in served.engine.aborted), served.engine.aborted
    assert _wait_for(lambda: _requests(served, "DEADLINE_EXCEEDED") == 1)
