"""The asyncio front: streams, cancellation freeing blocks, errors before output, drain."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.request import FinishReason
from peftserve.errors import InvalidRequest, NonFiniteOutput, Unavailable
from tests.engine.conftest import reference_greedy, request


@pytest.fixture
def async_engine(make_engine):
    engine, reference, _ = make_engine()
    front = AsyncEngine(engine)
    yield front, reference
    front.shutdown()


def test_concurrent_streams_match_reference(async_engine):
    front, reference = async_engine

    async def run(rid, prompt):
        tokens = []
        async for out in front.generate(request(rid, prompt, max_new_tokens=12)):
            tokens += out.token_ids
        return tokens

    async def main():
        prompts = [[5, 6, 7], [9] * 20, [100, 101]]
        return prompts, await asyncio.gather(*(run(str(i), p) for i, p in enumerate(prompts)))

    prompts, results = asyncio.run(main())
    for prompt, tokens in zip(prompts, results, strict=True):
        assert tokens == reference_greedy(reference, prompt, 12)


def test_a_request_with_non_finite_logits_fails_with_its_own_error(make_engine):
    engine, reference, _ = make_engine()
    with torch.no_grad():  # token 7 makes NaN of whatever sequence holds it, and only of that one
        engine.runner.model.get_input_embeddings().weight[7] = float("nan")
    front = AsyncEngine(engine)

    async def run(rid, prompt):
        tokens = []
        async for out in front.generate(request(rid, prompt, max_new_tokens=10)):
            tokens += out.token_ids
        return tokens

    async def main():
        return await asyncio.gather(run("bad", [5, 7, 9]), run("good", [5, 8, 9, 10]), return_exceptions=True)

    try:
        bad, good = asyncio.run(main())
    finally:
        front.shutdown()
    assert isinstance(bad, NonFiniteOutput) and "output token 1" in str(bad)
    assert good == reference_greedy(reference, [5, 8, 9, 10], 10)
    assert engine.stats().kv_blocks_used == 0


def test_closing_a_stream_aborts_and_frees_blocks(async_engine):
    front, _ = async_engine

    async def main():
        stream = front.generate(request("c", [5] * 30, max_new_tokens=400))
        await stream.__anext__()
        assert front.stats().kv_blocks_used > 0
        await stream.aclose()
        for _ in range(100):  # one engine step is milliseconds here
            if front.stats().kv_blocks_used == 0 and front.stats().running == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("blocks not freed after the stream was closed")

    asyncio.run(main())


def test_validation_errors_raise_before_any_output(async_engine):
    front, _ = async_engine

    async def main():
        with pytest.raises(InvalidRequest, match="top_p"):
            async for _ in front.generate(request("bad", [5], top_p=2.0)):
                pass

    asyncio.run(main())


def test_drain_finishes_short_requests_and_cancels_long_ones(async_engine, monkeypatch):
    front, _ = async_engine
    real_step = front.engine.step

    def slow_step():  # 5 ms a step: the long request needs seconds, the short one milliseconds
        time.sleep(0.005)
        return real_step()

    monkeypatch.setattr(front.engine, "step", slow_step)

    async def collect(rid, n):
        outs = [o async for o in front.generate(request(rid, [7, 8, 9], max_new_tokens=n))]
        return outs[-1].finish_reason

    async def main():
        short = asyncio.create_task(collect("short", 3))
        long = asyncio.create_task(collect("long", 450))
        await asyncio.sleep(0.05)
        await front.drain(grace_s=0.5)
        with pytest.raises(Unavailable):
            async for _ in front.generate(request("late", [5])):
                pass
        return await short, await long

    short, long = asyncio.run(main())
    assert short is FinishReason.LENGTH
    assert long is FinishReason.CANCELLED
