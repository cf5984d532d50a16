"""The official openai client against the HTTP API of a real server around a FakeEngine.

The fake echoes the prompt's bytes one token at a time, so every answer is known in advance.
"""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from peftserve.engine.request import AdapterRef, SamplingParams
from peftserve.errors import CapacityExceeded
from peftserve_client import Client, PeftServeError

from .conftest import Served
from .fake_admin import write_peft_dir


def client(s: Served, key: str = "any", **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.base_url, api_key=key, **{"max_retries": 0, **kwargs})


def message(error: openai.APIStatusError) -> str:
    """The server's message (the exception's own text adds 'Error code: 404 - ')."""
    return error.body["message"]


def test_completion_of_a_text_prompt(local: Served) -> None:
    result = client(local).completions.create(model="fake", prompt="hello", max_tokens=7)
    choice = result.choices[0]
    assert (choice.text, choice.finish_reason, choice.index) == ("hellohe", "length", 0)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        5,
        7,
        12,
    )
    assert result.object == "text_completion" and result.model == "fake" and result.id.startswith("cmpl-")
    (request,) = local.engine.requests
    # OpenAI's defaults where the body is silent: temperature 1; the caller's tenant is set.
    assert request.sampling == SamplingParams(max_new_tokens=7, temperature=1.0)
    assert request.adapters == () and request.tenant == "default" and request.prompt == "hello"


def test_completion_defaults_to_16_tokens_and_takes_token_ids(local: Served) -> None:
    result = client(local).completions.create(model="fake", prompt=[104, 105])
    assert result.choices[0].text == "hi" * 8
    assert local.engine.requests[0].prompt_token_ids == [104, 105]


def test_chat_renders_the_template_and_names_the_adapter(local: Served) -> None:
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    result = client(local).chat.completions.create(model="lora-a", messages=messages, max_tokens=9)
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "system: b"
    assert result.object == "chat.completion" and result.model == "default/lora-a"
    (request,) = local.engine.requests
    assert request.adapters == (AdapterRef("default/lora-a"),)
    assert bytes(request.prompt_token_ids) == b"system: be brief\nuser: hi\nassistant:"


def test_chat_with_text_parts_and_the_developer_role(local: Served) -> None:
    messages = [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    client(local).chat.completions.create(model="fake", messages=messages, max_tokens=1)
    assert bytes(local.engine.requests[0].prompt_token_ids) == b"system: rules\nuser: ab\nassistant:"


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(local: Served) -> None:
    client(local).chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])
    # the fake's limit (64) is below its context (512) minus the prompt
    assert local.engine.requests[0].sampling.max_new_tokens == 64


def test_streamed_completion_and_chat_concatenate_to_the_whole(local: Served) -> None:
    c = client(local)
    whole = c.completions.create(model="fake", prompt="stream me", max_tokens=12).choices[0].text
    chunks = list(c.completions.create(model="fake", prompt="stream me", max_tokens=12, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == whole
    assert [ch.choices[0].finish_reason for ch in chunks] == [None] * 11 + ["length"]

    messages = [{"role": "user", "content": "yo"}]
    stream = c.chat.completions.create(
        model="fake", messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert deltas[0].role == "assistant" and all(d.role is None for d in deltas[1:])
    assert "".join(d.content for d in deltas) == "user:"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(ch.usage is None for ch in chunks[:-1])


def test_async_client_runs_requests_concurrently(local: Served) -> None:
    local.engine.token_delay_s = 0.02

    async def run() -> tuple[list[str], str, float]:
        async with openai.AsyncOpenAI(base_url=local.base_url, api_key="k", max_retries=0) as c:
            began = time.perf_counter()
            results = await asyncio.gather(
                *(c.completions.create(model="fake", prompt=f"p{i}", max_tokens=10) for i in range(4))
            )
            elapsed = time.perf_counter() - began
            stream = await c.chat.completions.create(
                model="fake", messages=[{"role": "user", "content": "q"}], max_tokens=4, stream=True
            )
            text = "".join([ch.choices[0].delta.content async for ch in stream])
        return [r.choices[0].text for r in results], text, elapsed

    texts, text, elapsed = asyncio.run(run())
    assert texts == [(f"p{i}" * 5)[:10] for i in range(4)]
    assert text == "user"
    assert elapsed < 4 * 10 * 0.02  # the four overlapped


def test_sampling_options_and_extra_body_reach_the_engine(local: Served) -> None:
    client(local).completions.create(
        model="fake",
        prompt="abc",
        max_tokens=5,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["x", "yz"],
        logprobs=0,
        extra_body={"top_k": 3, "repetition_penalty": 1.2, "ignore_eos": True, "stop_token_ids": [0]},
    )
    assert local.engine.requests[0].sampling == SamplingParams(
        max_new_tokens=5,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=("x", "yz"),
        top_k=3,
        repetition_penalty=1.2,
        ignore_eos=True,
        stop_token_ids=(0,),
        logprobs=True,
    )


def test_logprobs_of_completions_and_chat(local: Served) -> None:
    c = client(local)
    lp = c.completions.create(model="fake", prompt="ab", max_tokens=3, logprobs=0).choices[0].logprobs
    assert (lp.tokens, lp.token_logprobs, lp.text_offset) == (["a", "b", "a"], [-0.5] * 3, [0, 1, 2])
    assert lp.top_logprobs == [{"a": -0.5}, {"b": -0.5}, {"a": -0.5}]
    messages = [{"role": "user", "content": "q"}]
    chat = c.chat.completions.create(model="fake", messages=messages, max_tokens=2, logprobs=True)
    content = chat.choices[0].logprobs.content
    assert [(t.token, t.logprob, t.bytes, t.top_logprobs) for t in content] == [
        ("u", -0.5, [117], []),
        ("s", -0.5, [115], []),
    ]


def test_a_weighted_mixture_in_extra_body(local: Served) -> None:
    c = client(local)
    c.completions.create(model="fake", prompt="m", max_tokens=1, extra_body={"adapters": {"lora-a": 0.7}})
    assert local.engine.requests[0].adapters == (AdapterRef("default/lora-a", 0.7),)
    with pytest.raises(openai.BadRequestError, match="runs on the base model"):
        c.completions.create(model="lora-a", prompt="m", extra_body={"adapters": {"lora-a": 0.7}})
    too_many = {f"a{i}": 0.1 for i in range(9)}
    with pytest.raises(openai.BadRequestError, match="at most 8 adapters"):
        c.completions.create(model="fake", prompt="m", extra_body={"adapters": too_many})


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"extra_body": {"tools": []}}, "tools"),
        ({"extra_body": {"response_format": {"type": "json_object"}}}, "response_format"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"logprobs": 2}, "logprobs"),
        ({"echo": True}, "echo"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_an_unsupported_parameter_is_a_400_naming_it(local: Served, kwargs: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client(local).completions.create(model="fake", prompt="x", **kwargs)
    assert refused.value.status_code == 400
    assert refused.value.param == param and param in message(refused.value)
    assert local.engine.requests == []


def test_neutral_values_of_unsupported_parameters_are_accepted(local: Served) -> None:
    client(local).completions.create(
        model="fake", prompt="x", max_tokens=1, n=1, presence_penalty=0, frequency_penalty=0, user="u-1"
    )
    assert len(local.engine.requests) == 1


def test_chat_without_a_template_is_a_400_that_says_so(local: Served) -> None:
    local.engine.has_chat_template = False
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        client(local).chat.completions.create(model="fake", messages=[{"role": "user", "content": "x"}])


def _grpc_message(s: Served, **options: object) -> str:
    with Client(s.address, timeout=10) as grpc_client, pytest.raises(PeftServeError) as refused:
        grpc_client.generate("x", **options)
    return refused.value.message


def test_errors_are_typed_and_read_as_over_grpc(local: Served) -> None:
    c = client(local)
    with pytest.raises(openai.NotFoundError) as missing:
        c.completions.create(model="acme/nope", prompt="x")
    assert message(missing.value) == _grpc_message(local, adapter_id="acme/nope")
    assert missing.value.code == "not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="fake", prompt="x", max_tokens=0)
    assert message(bad.value) == _grpc_message(local, max_new_tokens=0)
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model="fake", prompt="x", top_p=1.5)
    assert message(bad.value) == "top_p must be in (0, 1], got 1.5"

    local.engine.draining = True
    with pytest.raises(openai.InternalServerError) as draining:
        c.completions.create(model="fake", prompt="x")
    assert draining.value.status_code == 503 and message(draining.value) == "server is draining"


def test_429_carries_retry_after_and_the_client_retries(local: Served) -> None:
    local.engine.fail_next = [CapacityExceeded("queue is full (1024 waiting)", retry_after_s=0.4)]
    began = time.perf_counter()
    result = client(local, max_retries=2).completions.create(model="fake", prompt="ok", max_tokens=2)
    assert result.choices[0].text == "ok"
    assert local.engine.attempts == 2 and time.perf_counter() - began >= 1.0  # Retry-After: 1 (rounded up)

    local.engine.fail_with = CapacityExceeded("queue is full (1024 waiting)", retry_after_s=2.5)
    with pytest.raises(openai.RateLimitError) as full:
        client(local).completions.create(model="fake", prompt="ok")
    assert full.value.response.headers["retry-after"] == "3"
    assert message(full.value) == "queue is full (1024 waiting)"


def test_keys_tenants_and_scopes(with_keys: Served) -> None:
    keys = with_keys.api_keys
    with pytest.raises(openai.AuthenticationError) as unknown:
        client(with_keys, key="psk_000000000000_nope").completions.create(model="fake", prompt="x")
    assert message(unknown.value) == "invalid API key"
    with pytest.raises(openai.PermissionDeniedError, match="'infer' scope"):
        client(with_keys, key=keys["acme-admin"]).completions.create(model="fake", prompt="x")
    acme = client(with_keys, key=keys["acme"])
    assert acme.completions.create(model="lora-a", prompt="x", max_tokens=1).model == "acme/lora-a"
    assert with_keys.engine.requests[0].tenant == "acme"
    # another tenant's adapter reads exactly like a missing one
    with pytest.raises(openai.NotFoundError) as other:
        acme.completions.create(model="globex/lora-g", prompt="x")
    with pytest.raises(openai.NotFoundError) as missing:
        acme.completions.create(model="globex/nothing", prompt="x")
    assert message(other.value).replace("lora-g", "X") == message(missing.value).replace("nothing", "X")


def test_models_list_the_base_and_the_tenants_adapters(with_keys: Served, tmp_path) -> None:
    keys = with_keys.api_keys
    with Client(with_keys.address, timeout=10, api_key=keys["acme"]) as acme:
        acme.upload_adapter(write_peft_dir(tmp_path / "a"), "support")
    with Client(with_keys.address, timeout=10, api_key=keys["globex"]) as globex:
        globex.upload_adapter(write_peft_dir(tmp_path / "g"), "secret")
    models = client(with_keys, key=keys["acme-infer"]).models.list().data
    assert [(m.id, m.owned_by, m.parent) for m in models] == [
        ("fake", "peftserve", None),
        ("acme/support", "acme", "fake"),
    ]
    assert all(m.object == "model" and m.created > 0 for m in models)
    c = client(with_keys, key=keys["acme"])
    assert c.models.retrieve("support").id == "acme/support"
    assert c.models.retrieve("fake").owned_by == "peftserve"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("globex/secret")


def test_models_without_keys_list_every_tenants_adapters(local: Served, tmp_path) -> None:
    with Client(local.address, timeout=10) as grpc_client:
        for adapter_id in ("acme/support", "globex/support", "tone"):
            grpc_client.upload_adapter(write_peft_dir(tmp_path / adapter_id), adapter_id)
    models = client(local).models.list().data
    assert [(m.id, m.owned_by) for m in models] == [
        ("fake", "peftserve"),
        ("acme/support", "acme"),
        ("default/tone", "default"),
        ("globex/support", "globex"),
    ]
