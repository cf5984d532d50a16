"""The asyncio front: streams, cancellation freeing blocks, errors before output, drain."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.request import FinishReason
from peftserve.errors import EngineFailure, InvalidRequest, NonFiniteOutput, Unavailable
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


def _slow_steps(front: AsyncEngine, monkeypatch, step_s: float = 0.005) -> list[int]:
    """Make each engine step last step_s (GIL released); returns the list of each step's output count."""
    real_step, counts = front.engine.step, []

    def slow_step():
        time.sleep(step_s)
        outputs = real_step()
        counts.append(len(outputs))
        return outputs

    monkeypatch.setattr(front.engine, "step", slow_step)
    return counts


def test_a_lagging_stream_takes_its_waiting_increments_merged(async_engine, monkeypatch):
    front, reference = async_engine
    _slow_steps(front, monkeypatch)
    prompt = [5, 6, 7]

    async def main():
        lagging = front.generate(request("lagging", prompt, max_new_tokens=6, logprobs=True))
        first = await anext(lagging)
        async for _ in front.generate(request("other", [9, 10], max_new_tokens=10)):
            pass  # meanwhile the lagging stream's other five tokens were produced (its outputs came first)
        return first, [out async for out in lagging]

    first, rest = asyncio.run(main())
    assert len(rest) == 1  # not one increment per token: what waited came merged
    (last,) = rest
    assert list(first.token_ids + last.token_ids) == reference_greedy(reference, prompt, 6)
    assert len(last.token_ids) == len(last.logprobs) == 6 - first.completion_tokens > 1
    assert last.finish_reason is FinishReason.LENGTH and last.completion_tokens == 6
    assert last.prompt_tokens == len(prompt)


def test_outputs_cross_to_the_loop_once_per_step_not_once_per_request(async_engine, monkeypatch):
    front, _ = async_engine
    step_outputs = _slow_steps(front, monkeypatch)

    async def collect(rid, prompt):
        return [out async for out in front.generate(request(rid, prompt, max_new_tokens=6))]

    async def main():
        loop, wakeups = asyncio.get_running_loop(), []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *args, **kwargs: wakeups.append(1) or real(*args, **kwargs)
        streams = await asyncio.gather(*(collect(str(i), [5 + i, 6, 7]) for i in range(4)))
        return streams, len(wakeups)

    streams, wakeups = asyncio.run(main())
    assert [sum(len(o.token_ids) for o in s) for s in streams] == [6] * 4
    assert wakeups == sum(1 for n in step_outputs if n) < sum(step_outputs) == 24


def test_increments_waiting_when_the_engine_fails_still_come_before_the_error(async_engine, monkeypatch):
    front, _ = async_engine
    step_outputs = _slow_steps(front, monkeypatch)
    counted_step = front.engine.step

    def failing_step():
        if len(step_outputs) == 3:
            raise RuntimeError("device lost")
        return counted_step()

    monkeypatch.setattr(front.engine, "step", failing_step)

    async def main():
        stream, tokens = front.generate(request("r", [5, 6, 7], max_new_tokens=10)), []
        tokens += (await anext(stream)).token_ids
        await asyncio.sleep(0.1)  # lag: the next two steps' tokens and the failure wait
        with pytest.raises(EngineFailure):
            async for out in stream:
                tokens += out.token_ids
        return tokens

    assert len(asyncio.run(main())) == 3
