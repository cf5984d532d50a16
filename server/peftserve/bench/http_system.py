"""peftserve over its OpenAI-compatible HTTP API: the gRPC system's trace through the async openai client.

Each request is a streamed /v1/completions call with the trace's prompt token ids, `model` naming the
adapter (or the base model), greedy, EOS ignored, sent at its arrival time; the usage chunk at the end
gives the tokens generated. So the two systems differ only in the front door they go through.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftserve.bench.records import RequestRecord
from peftserve.bench.workload import TraceRequest

if TYPE_CHECKING:
    import openai


@dataclass(frozen=True)
class Streamed:
    """One streamed completion: perf_counter times of its first chunk and its end, and what it generated."""

    first_token_at: float | None
    finished_at: float
    completion_tokens: int
    """From the usage chunk at the end."""
    token_ids: list[int]
    """The generated ids, when asked for (vLLM's `return_token_ids`); else empty."""


async def stream_completion(
    client: openai.AsyncOpenAI,
    model: str,
    prompt_ids: Sequence[int],
    max_tokens: int,
    *,
    return_token_ids: bool = False,
) -> Streamed:
    """A streamed /v1/completions call on token ids: greedy, EOS ignored, usage at the end."""
    extra: dict[str, bool] = {"ignore_eos": True}
    if return_token_ids:
        extra["return_token_ids"] = True
    stream = await client.completions.create(
        model=model,
        prompt=list(prompt_ids),
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    first_token_at, tokens, token_ids = None, 0, []
    async for chunk in stream:
        if chunk.choices:
            if first_token_at is None:
                first_token_at = time.perf_counter()
            token_ids += getattr(chunk.choices[0], "token_ids", None) or []  # an extra field of vLLM's
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return Streamed(first_token_at, time.perf_counter(), tokens, token_ids)


async def _send(client: openai.AsyncOpenAI, request: TraceRequest, model: str, start: float) -> RequestRecord:
    """Wait for the request's arrival, stream it, and time its first and last tokens."""
    import openai

    await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
    try:
        out = await stream_completion(client, model, request.prompt_ids, request.output_len)
    except openai.OpenAIError as exc:
        return RequestRecord(request.index, request.arrival, len(request.prompt_ids), 0, None, None, str(exc))
    first_token = None if out.first_token_at is None else out.first_token_at - start
    return RequestRecord(
        request.index,
        request.arrival,
        len(request.prompt_ids),
        out.completion_tokens,
        first_token,
        out.finished_at - start,
    )


async def _run(
    base_url: str, trace: Sequence[TraceRequest], adapter_ids: Sequence[str] | None
) -> list[RequestRecord]:

    async with client_for(base_url) as client:
        # As many kept-alive connections as requests may run at once, opened before the clock starts,
        # as a long-running client holds them (the gRPC system's channel is connected likewise).
        listed = await asyncio.gather(*(client.models.list() for _ in range(len(trace))))
        base = listed[0].data[0].id  # the base model comes first
        start = time.perf_counter()
        return list(
            await asyncio.gather(
                *(_send(client, r, adapter_ids[r.adapter] if adapter_ids else base, start) for r in trace)
            )
        )


def client_for(base_url: str) -> openai.AsyncOpenAI:
    """The async openai client on its aiohttp transport (the openai[aiohttp] extra), which its docs
    recommend for many concurrent requests: client and server on one 2-core box, it raised the HTTP
    system's tokens per CPU-second from 0.87-0.90x to 0.95x gRPC's (benchmarks/README.md)."""
    import openai

    return openai.AsyncOpenAI(
        base_url=f"{base_url}/v1", api_key="bench", max_retries=0, http_client=openai.DefaultAioHttpClient()
    )


def run_trace(
    base_url: str, trace: Sequence[TraceRequest], adapter_ids: Sequence[str] | None
) -> list[RequestRecord]:
    """Serve the trace on the HTTP API at base_url (http://host:port); request i uses
    adapter_ids[trace[i].adapter], or the base model when adapter_ids is None."""
    return asyncio.run(_run(base_url, trace, adapter_ids))


def warm_up(base_url: str, adapter_ids: Sequence[str]) -> None:
    """A few short requests over HTTP, so first-call costs stay out of the timed runs."""
    trace = [TraceRequest(i, 0.0, i, (5, 6, 7, 8), 4) for i in range(len(adapter_ids))]
    errors = [r.error for r in run_trace(base_url, trace, adapter_ids) if r.error]
    if errors:
        raise RuntimeError(f"warm-up request over HTTP failed: {errors[0]}")
