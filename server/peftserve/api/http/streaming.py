"""Running one generation for an HTTP request: metrics, client disconnects, server-sent events.

A client that goes away cancels its request: the engine's stream is closed, which aborts the request
and frees its KV blocks within one engine step. Before the response starts (queued, or a whole
non-streamed completion) a watcher on the ASGI receive channel notices the disconnect; once an event
stream has started, Starlette's StreamingResponse does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.sse import EventSourceResponse, format_sse_event

from peftserve.api.http.errors import error_of
from peftserve.api.status import code_of
from peftserve.engine.protocol import EngineClient
from peftserve.engine.request import GenerationRequest, RequestOutput
from peftserve.metrics import RequestTrace, ServerMetrics

T = TypeVar("T")
DONE = format_sse_event(data_str="[DONE]")
"""The last event of every stream, as the openai client expects."""
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
"""Compact JSON; one encoder for every event (json.dumps with options builds one per call)."""


class ClientGone(Exception):
    """The client disconnected before its response started."""


async def outputs(
    engine: EngineClient, metrics: ServerMetrics, request: GenerationRequest, trace: RequestTrace
) -> AsyncIterator[RequestOutput]:
    """The engine's increments of request, recorded in metrics with their gRPC status name as over gRPC.

    Closing this iterator closes the engine's, which aborts the request and frees its KV blocks.
    """
    status = "OK"
    stream: AsyncIterator[RequestOutput] | None = None
    try:
        stream = engine.generate(request)
        async for output in stream:
            trace.observe(output)
            yield output
    except (asyncio.CancelledError, GeneratorExit):
        status = "CANCELLED"
        raise
    except Exception as e:
        status = code_of(e).name
        raise
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
        metrics.record(trace, status)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (the body is read already, so only the disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """work's result; if the client disconnects first, work is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    raise ClientGone


def _event(data: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=_dumps(data))


def event_stream(
    first: RequestOutput,
    rest: AsyncIterator[RequestOutput],
    chunk: Callable[[RequestOutput], dict[str, Any]],
    usage_chunk: Callable[[RequestOutput], dict[str, Any]] | None,
) -> EventSourceResponse:
    """The response streaming every increment as `data: {chunk}`, then the usage chunk if asked, then
    `data: [DONE]`. A failure mid-stream is sent as one `data: {"error": ...}` event before [DONE]."""

    async def events() -> AsyncIterator[bytes]:
        last = first
        async with contextlib.aclosing(rest):
            try:
                yield _event(chunk(first))
                async for output in rest:
                    last = output
                    yield _event(chunk(output))
                if usage_chunk is not None:
                    yield _event(usage_chunk(last))
            except Exception as e:  # the status line has gone: the error travels as an event
                yield _event(error_of(e)[1])
        yield DONE

    return EventSourceResponse(events(), headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
