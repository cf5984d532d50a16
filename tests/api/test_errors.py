"""Every failure reaches the client as the right exception (status code) with its message."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from peftserve import errors
from peftserve_client import (
    AsyncClient,
    Client,
    InternalError,
    InvalidArgument,
    NotFound,
    PeftServeError,
    ResourceExhausted,
    Unavailable,
)

from .conftest import Served


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prompt": ""}, "prompt must not be empty"),
        ({"max_new_tokens": 0}, "max_new_tokens must be > 0"),
        ({"max_new_tokens": -3}, "max_new_tokens must be > 0"),
        ({"max_new_tokens": 65}, "max_new_tokens must be <= 64"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_p": 1.5}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"stop": ["x"] * 17}, "at most 16 stop strings"),
        ({"stop_token_ids": [300]}, "outside the vocabulary"),
        ({"adapter_id": "lora-a", "adapters": {"lora-a": 1.0}}, "not both"),
        ({"prompt_token_ids": [1, 2]}, "not both"),
    ],
)
def test_bad_input_is_invalid_argument_with_the_message(
    served: Served, kwargs: dict[str, Any], match: str
) -> None:
    kwargs = {"prompt": "hi", **kwargs}
    with Client(served.address, timeout=5) as client:
        with pytest.raises(InvalidArgument, match=match) as unary:
            client.generate(**kwargs)
        with pytest.raises(InvalidArgument, match=match):
            list(client.generate_stream(**kwargs))
    assert unary.value.code == "INVALID_ARGUMENT"
    assert not served.engine.requests


def test_unknown_adapter_is_not_found(served: Served) -> None:
    with Client(served.address, timeout=5) as client, pytest.raises(NotFound, match="nobody"):
        client.generate("hi", adapter_id="nobody")


def test_full_queue_is_resource_exhausted(served: Served) -> None:
    served.engine.queue_full = True
    with Client(served.address, timeout=5) as client, pytest.raises(ResourceExhausted, match="queue is full"):
        list(client.generate_stream("hi"))


def test_a_quota_carries_its_retry_hint_to_both_clients(served: Served) -> None:
    served.engine.fail_with = errors.CapacityExceeded("tenant 'acme' is over its limit", retry_after_s=2.2)
    with Client(served.address, timeout=5) as client:
        with pytest.raises(ResourceExhausted, match="over its limit") as unary:
            client.generate("hi")
        with pytest.raises(ResourceExhausted) as stream:
            list(client.generate_stream("hi"))
    assert unary.value.retry_after == stream.value.retry_after == 3.0  # whole seconds, rounded up

    async def main() -> float | None:
        async with AsyncClient(served.address, timeout=5) as client:
            with pytest.raises(ResourceExhausted) as info:
                await client.generate("hi")
            return info.value.retry_after

    assert asyncio.run(main()) == 3.0
    served.engine.fail_with = errors.CapacityExceeded("queue is full")  # no hint: none is made up
    with Client(served.address, timeout=5) as client, pytest.raises(ResourceExhausted) as plain:
        client.generate("hi")
    assert plain.value.retry_after is None


def test_draining_engine_is_unavailable(served: Served) -> None:
    served.engine.draining = True
    with Client(served.address, timeout=5) as client, pytest.raises(Unavailable, match="draining"):
        client.generate("hi")


def test_unexpected_engine_error_is_internal_without_details(served: Served) -> None:
    served.engine.fail_with = RuntimeError("CUDA exploded at 0xdeadbeef")
    with Client(served.address, timeout=5) as client, pytest.raises(InternalError) as info:
        client.generate("hi")
    assert "0xdeadbeef" not in info.value.message


def test_async_client_maps_errors_too(served: Served) -> None:
    served.engine.fail_with = errors.AdapterNotFound("adapter 'x' not found")

    async def main() -> None:
        async with AsyncClient(served.address, timeout=5) as client:
            with pytest.raises(NotFound, match="'x'"):
                await client.generate("hi")
            with pytest.raises(NotFound):
                [c async for c in client.generate_stream("hi")]
            served.engine.fail_with = None
            with pytest.raises(InvalidArgument):
                await client.generate("hi", top_p=2.0)

    asyncio.run(main())


def test_unreachable_server_is_unavailable() -> None:
    with Client("127.0.0.1:1", timeout=2) as client, pytest.raises(Unavailable) as info:
        client.model_info()
    assert isinstance(info.value, PeftServeError)


@pytest.mark.parametrize("adapter_id", ["A" * 10_000, "acme/" + "x" * 10_000, "x@" + "v" * 10_000])
def test_errors_quote_a_bounded_prefix_of_what_was_sent(served: Served, adapter_id: str) -> None:
    with Client(served.address, timeout=5) as client, pytest.raises(InvalidArgument) as info:
        client.generate("hi", adapter_id=adapter_id)
    assert len(info.value.message) < 300 and "characters)" in info.value.message
