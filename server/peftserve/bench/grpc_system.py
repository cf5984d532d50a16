"""peftserve over gRPC: every trace request streamed concurrently with the async SDK at its arrival time.

The same function measures the base-model limit: the identical trace on the identical server with no
adapter named, so the only difference is what the adapters cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from peftserve.bench.records import RequestRecord
from peftserve.bench.workload import TraceRequest
from peftserve_client import AsyncClient, PeftServeError


async def _send(
    client: AsyncClient, request: TraceRequest, adapter_id: str | None, start: float
) -> RequestRecord:
    """Wait for the request's arrival, stream it, and time its first and last tokens."""
    await asyncio.sleep(max(0.0, start + request.arrival - time.perf_counter()))
    first_token = finished = None
    tokens = 0
    try:
        stream = client.generate_stream(
            prompt_token_ids=list(request.prompt_ids),
            adapter_id=adapter_id,
            max_new_tokens=request.output_len,
            ignore_eos=True,
        )
        async for chunk in stream:
            if chunk.token_ids:
                tokens += len(chunk.token_ids)
                if first_token is None:
                    first_token = time.perf_counter() - start
        finished = time.perf_counter() - start
    except PeftServeError as exc:
        return RequestRecord(
            request.index, request.arrival, len(request.prompt_ids), tokens, first_token, None, str(exc)
        )
    return RequestRecord(
        request.index, request.arrival, len(request.prompt_ids), tokens, first_token, finished
    )


async def _run(
    address: str, trace: Sequence[TraceRequest], adapter_ids: Sequence[str] | None
) -> list[RequestRecord]:
    async with AsyncClient(address) as client:
        await client.model_info()  # the channel connected before the clock starts, as a running client's is
        start = time.perf_counter()
        return list(
            await asyncio.gather(
                *(_send(client, r, adapter_ids[r.adapter] if adapter_ids else None, start) for r in trace)
            )
        )


def run_trace(
    address: str, trace: Sequence[TraceRequest], adapter_ids: Sequence[str] | None
) -> list[RequestRecord]:
    """Serve the trace on the server at `address`; request i uses adapter_ids[trace[i].adapter], or the
    base model when adapter_ids is None."""
    return asyncio.run(_run(address, trace, adapter_ids))


def warm_up(address: str, adapter_ids: Sequence[str]) -> None:
    """A few short requests (base and adapters) so first-call costs stay out of the timed runs."""
    trace = [TraceRequest(i, 0.0, i, (5, 6, 7, 8), 4) for i in range(len(adapter_ids))]
    for records in (run_trace(address, trace[:1], None), run_trace(address, trace, adapter_ids)):
        errors = [r.error for r in records if r.error]
        if errors:
            raise RuntimeError(f"warm-up request failed: {errors[0]}")
