"""Generate, stream, tokenize and model info through the real server and both clients."""

from __future__ import annotations

import asyncio

from peftserve_client import AsyncClient, Client, FinishReason, Usage

from .conftest import Served


def test_sync_generate_echoes_the_prompt(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        result = client.generate("hello", max_new_tokens=3, logprobs=True, request_id="r-1")
    assert (result.request_id, result.text, result.token_ids) == ("r-1", "hel", tuple(b"hel"))
    assert result.finish_reason is FinishReason.LENGTH
    assert result.usage == Usage(prompt_tokens=5, completion_tokens=3)
    assert result.logprobs == (-0.5, -0.5, -0.5)


def test_unset_options_reach_the_engine_as_defaults_and_set_ones_as_given(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        client.generate("ab", max_new_tokens=1)
        client.generate(
            prompt_token_ids=[104, 105],
            adapters={"lora-a": 0.5},
            max_new_tokens=2,
            temperature=0.7,
            top_k=5,
            top_p=0.9,
            seed=7,
            repetition_penalty=1.1,
            stop="\n",
            stop_token_ids=[3],
            ignore_eos=True,
        )
    default, custom = served.engine.requests
    assert default.sampling.temperature == 0.0 and default.sampling.seed is None and not default.adapters
    s = custom.sampling
    assert (s.temperature, s.top_k, s.top_p, s.seed, s.repetition_penalty) == (0.7, 5, 0.9, 7, 1.1)
    assert (s.stop, s.stop_token_ids, s.ignore_eos) == (("\n",), (3,), True)
    assert custom.prompt_token_ids == [104, 105] and custom.adapters[0].weight == 0.5


def test_sync_stream_deltas_concatenate_to_the_unary_text(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        chunks = list(client.generate_stream("stream me", max_new_tokens=6, adapter_id="lora-a"))
        whole = client.generate("stream me", max_new_tokens=6, adapter_id="lora-a")
    assert "".join(c.text for c in chunks) == whole.text == "stream"
    assert [t for c in chunks for t in c.token_ids] == list(whole.token_ids)
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert chunks[-1].usage == Usage(prompt_tokens=9, completion_tokens=6)


def test_stop_token_finishes_with_stop(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        result = client.generate("abc", max_new_tokens=10, stop_token_ids=[ord("b")])
    assert (result.text, result.finish_reason) == ("ab", FinishReason.STOP)


def test_tokenize_and_model_info(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        tok = client.tokenize("hi!")
        info = client.model_info()
    assert tok.token_ids == (104, 105, 33) and tok.tokens == ("h", "i", "!")
    assert (info.model_id, info.vocab_size, info.max_new_tokens_limit, info.eos_token_ids) == (
        "fake",
        256,
        64,
        (0,),
    )
    assert info.server_version


def test_async_client_unary_stream_and_info(served: Served) -> None:
    async def main() -> None:
        async with AsyncClient(served.address, timeout=5) as client:
            result = await client.generate("async", max_new_tokens=4)
            chunks = [c async for c in client.generate_stream("async", max_new_tokens=4)]
            assert "".join(c.text for c in chunks) == result.text == "asyn"
            assert chunks[-1].usage == result.usage
            assert (await client.tokenize("a")).token_ids == (97,)
            assert (await client.model_info()).family == "echo"

    asyncio.run(main())


def test_many_concurrent_async_streams(served: Served) -> None:
    async def one(client: AsyncClient, i: int) -> str:
        return "".join([c.text async for c in client.generate_stream(f"p{i:02d}", max_new_tokens=3)])

    async def main() -> list[str]:
        async with AsyncClient(served.address, timeout=5) as client:
            return await asyncio.gather(*(one(client, i) for i in range(20)))

    assert asyncio.run(main()) == [f"p{i:02d}" for i in range(20)]


def test_a_server_without_auth_accepts_an_api_key(served: Served) -> None:
    with Client(served.address, timeout=5, api_key="k-123") as client:
        assert client.generate("x", max_new_tokens=1).text == "x"
