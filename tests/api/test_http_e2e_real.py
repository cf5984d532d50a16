"""`peftserve serve --http-port 0` on the embedded default model with a LoRA adapter, as a subprocess:
HTTP and gRPC give the same greedy output, chat uses the model's template, a disconnect frees KV blocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx2
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from peftserve.bench.server import ServerProcess
from peftserve.model.default_model import ensure_default_model
from peftserve_client import Client
from tests.adapters import peft_factory as pf

pytestmark = pytest.mark.slow

PROMPT = "The quick brown fox"
GREEDY = {"temperature": 0, "max_tokens": 12, "extra_body": {"ignore_eos": True}}


@dataclass
class Running:
    process: ServerProcess
    address: str
    """gRPC HOST:PORT."""
    http_url: str
    """http://HOST:PORT"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = AutoModelForCausalLM.from_pretrained(ensure_default_model())
    lora = pf.make_lora_patterns(base, "llama", tmp_path_factory.mktemp("adapters") / "lora")
    process = ServerProcess.serve(
        ["--http-port", "0", "--store", "", "--adapter", f"acme/lora={lora}", "--kv-cache-mb", "64",
         "--dtype", "float32"]  # outputs compared token for token: bf16 rounding depends on the batch
    )  # fmt: skip
    try:
        grpc_address = process.wait_ready(240)
        assert process.http_url is not None
        yield Running(process, grpc_address, process.http_url)
    finally:
        process.stop()


def client(server: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="local", max_retries=0, timeout=60)


@pytest.mark.parametrize("model", ["default", "acme/lora"])
def test_greedy_http_output_equals_grpc(server: Running, model: str) -> None:
    with Client(server.address, timeout=60) as grpc_client:
        adapter = None if model == "default" else model
        want = grpc_client.generate(
            PROMPT, adapter_id=adapter, max_new_tokens=12, ignore_eos=True, logprobs=True
        )
        ids = list(grpc_client.tokenize(PROMPT).token_ids)
        from_ids = grpc_client.generate(
            prompt_token_ids=ids, adapter_id=adapter, max_new_tokens=12, ignore_eos=True
        )
    c = client(server)
    got = c.completions.create(model=model, prompt=PROMPT, logprobs=0, **GREEDY)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert got.choices[0].logprobs.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-4)
    assert c.completions.create(model=model, prompt=ids, **GREEDY).choices[0].text == from_ids.text
    streamed = c.completions.create(model=model, prompt=PROMPT, stream=True, **GREEDY)
    assert "".join(chunk.choices[0].text for chunk in streamed) == want.text


def test_the_adapter_changes_the_output(server: Running) -> None:
    c = client(server)
    texts = {
        m: c.completions.create(model=m, prompt=PROMPT, **GREEDY).choices[0].text
        for m in ("default", "acme/lora")
    }
    assert texts["default"] != texts["acme/lora"]


def test_chat_renders_the_default_models_template(server: Running) -> None:
    c = client(server)
    question = "Do you ship abroad?"
    chat = c.chat.completions.create(
        model="acme/lora", messages=[{"role": "user", "content": question}], **GREEDY
    )
    completion = c.completions.create(model="acme/lora", prompt=f"Q: {question}\nA:", **GREEDY)
    assert chat.choices[0].message.content == completion.choices[0].text
    assert chat.usage.prompt_tokens == completion.usage.prompt_tokens


def test_concurrent_requests_for_different_adapters_equal_their_sequential_results(server: Running) -> None:
    c = client(server)
    jobs = [("default", PROMPT), ("acme/lora", PROMPT), ("acme/lora", "Once upon"), ("default", "Once upon")]
    alone = [c.completions.create(model=m, prompt=p, **GREEDY).choices[0].text for m, p in jobs]

    async def together() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.http_url}/v1", api_key="k", max_retries=0) as ac:
            results = await asyncio.gather(
                *(ac.completions.create(model=m, prompt=p, **GREEDY) for m, p in jobs)
            )
        return [r.choices[0].text for r in results]

    assert asyncio.run(together()) == alone


def gauges(server: Running) -> dict[str, float]:
    """The running-requests and KV-blocks-used gauges of the HTTP port's /metrics."""
    text = httpx2.get(f"{server.http_url}/metrics", timeout=10).text
    wanted = ("peftserve_running_requests", "peftserve_kv_blocks_used")
    return {f.name: f.samples[0].value for f in text_string_to_metric_families(text) if f.name in wanted}


def test_a_disconnect_mid_stream_frees_the_requests_kv_blocks(server: Running) -> None:
    max_tokens, read = 1500, 20
    body = {
        "model": "acme/lora",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx2.Client(base_url=f"{server.http_url}/v1", timeout=60) as http:
        with http.stream("POST", "/completions", json=body) as response:
            lines = (line for line in response.iter_lines() if line.startswith("data: "))
            arrivals = [time.monotonic() for _, _ in zip(range(read), lines, strict=False)]
            during = gauges(server)
        left = time.monotonic()
    assert during["peftserve_running_requests"] == 1 and during["peftserve_kv_blocks_used"] > 0
    while (after := gauges(server)) != {"peftserve_running_requests": 0.0, "peftserve_kv_blocks_used": 0.0}:
        assert time.monotonic() < left + 30, after
        time.sleep(0.02)
    freed_after = time.monotonic() - left
    # it was cancelled, not finished: the rest of its tokens would have taken far longer
    rest = (max_tokens - read) * (arrivals[-1] - arrivals[4]) / (read - 5)
    assert freed_after < rest / 4, (freed_after, rest)
