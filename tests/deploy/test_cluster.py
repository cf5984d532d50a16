"""`peftserve cluster` end to end: two replicas on a local Ray cluster, the same SDK and the same
OpenAI-compatible HTTP API as one server, compared with one server started beside it.

Kept in one module so the cluster starts once (about half a minute on two cores); the replica kill
and then the drain (which stops the cluster) run last.
"""

from __future__ import annotations

import io
import os
import random
import signal
import tarfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx2
import openai
import pytest

from peftserve.bench.server import ServerProcess
from peftserve_client import Client
from peftserve_client.errors import PeftServeError

from .conftest import SLOTS, Cluster

pytestmark = pytest.mark.slow

PROMPTS = ("Hello, my name is", "Once upon a time", "The capital of France")
NEW_TOKENS = 12
GREEDY = {"temperature": 0, "max_tokens": NEW_TOKENS, "extra_body": {"ignore_eos": True}}
"""The openai client's arguments for the greedy completions the gRPC tests ask for."""


@dataclass
class Single:
    """One `peftserve serve` (local mode, its own store) to compare the cluster with."""

    address: str
    http_url: str


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Single]:
    store = tmp_path_factory.mktemp("single") / "store"
    # float32 like the cluster: outputs are compared token for token
    args = ["--threads", "1", "--store", str(store), "--http-port", "0", "--dtype", "float32"]
    process = ServerProcess.serve(args)
    try:
        address = process.wait_ready(120)
        assert process.http_url is not None
        yield Single(address, process.http_url)
    finally:
        process.stop()


def _greedy(client: Client, prompt: str, **options: object) -> tuple[int, ...]:
    result = client.generate(prompt, max_new_tokens=NEW_TOKENS, ignore_eos=True, **options)
    return result.token_ids


def _failure(call) -> tuple[str, str]:
    try:
        call()
    except PeftServeError as e:
        return e.code, e.message
    raise AssertionError("the call succeeded")


def _bad_calls(client: Client) -> list:
    return [
        lambda: client.generate("Hi", top_p=1.5),
        lambda: client.generate("Hi", max_new_tokens=0),
        lambda: client.generate("", max_new_tokens=4),
        lambda: client.generate("Hi", adapter_id="acme/nothing"),
        lambda: client.generate("Hi", adapter_id="acme/a0@v9"),
        lambda: client.generate("Hi", adapter_id="a/b/c"),
        lambda: list(client.generate_stream("Hi", top_k=-1)),
        lambda: client.get_adapter("acme/nothing"),
    ]


def test_greedy_output_and_errors_equal_one_server(cluster: Cluster, single: Single) -> None:
    with (
        Client(cluster.address, timeout=60, api_key=cluster.keys["acme"]) as remote,
        Client(single.address, timeout=60) as local,
    ):
        for name in ("a0", "a1"):
            assert remote.upload_adapter(cluster.adapters / name, name).version == "v1"
            local.upload_adapter(cluster.adapters / name, f"acme/{name}")
        cases = [{}, {"adapter_id": "acme/a0"}, {"adapter_id": "acme/a1"}]
        cases.append({"adapters": {"acme/a0": 0.7, "acme/a1": 0.3}})
        for prompt in PROMPTS:
            for options in cases:
                assert _greedy(remote, prompt, **options) == _greedy(local, prompt, **options), options
        streamed = remote.generate_stream(PROMPTS[0], adapter_id="a0", max_new_tokens=NEW_TOKENS)
        text = "".join(chunk.text for chunk in streamed)
        assert text == local.generate(PROMPTS[0], adapter_id="acme/a0", max_new_tokens=NEW_TOKENS).text
        assert remote.tokenize(PROMPTS[1]) == local.tokenize(PROMPTS[1])
        assert remote.model_info().vocab_size == local.model_info().vocab_size
        assert remote.model_info().prefix_cache is None  # each replica has its own cache
        assert local.model_info().prefix_cache is not None
        assert remote.health() == "SERVING"
        failures = [_failure(call) for call in _bad_calls(remote)]
        assert failures == [_failure(call) for call in _bad_calls(local)]
    assert all(code != "INTERNAL" for code, _ in failures)


def test_keys_and_tenants_are_checked(cluster: Cluster) -> None:
    with (
        Client(cluster.address, timeout=60) as anonymous,
        Client(cluster.address, timeout=60, api_key=cluster.keys["acme-infer"]) as infer_only,
        Client(cluster.address, timeout=60, api_key=cluster.keys["globex"]) as globex,
    ):
        assert _failure(lambda: anonymous.generate("Hi"))[0] == "UNAUTHENTICATED"
        assert _failure(lambda: infer_only.list_adapters())[0] == "PERMISSION_DENIED"
        theirs = _failure(lambda: globex.generate("Hi", adapter_id="acme/a0"))
        missing = _failure(lambda: globex.generate("Hi", adapter_id="acme/zzzz"))
        assert theirs[0] == "NOT_FOUND" and theirs[1].replace("a0", "zzzz") == missing[1]
        assert [s.manifest.adapter_id for s in globex.iter_adapters()] == []


def test_upload_then_generate_and_replace(cluster: Cluster) -> None:
    with Client(cluster.address, timeout=60, api_key=cluster.keys["acme"]) as client:
        assert client.upload_adapter(cluster.adapters / "a2", "support").version == "v1"
        first = _greedy(client, PROMPTS[0], adapter_id="support")
        assert client.upload_adapter(cluster.adapters / "a3", "support").version == "v2"
        with ThreadPoolExecutor(6) as pool:  # every request after the upload gets v2, wherever it runs
            after = list(pool.map(lambda _: _greedy(client, PROMPTS[0], adapter_id="support"), range(12)))
        pinned = _greedy(client, PROMPTS[0], adapter_id="support@v1")
        status = client.get_adapter("support")
    assert first != after[0] and set(after) == {after[0]}
    assert pinned == first
    assert status.manifest.version == "v2"


def test_routing_keeps_adapters_on_their_replicas(cluster: Cluster) -> None:
    """Power-law traffic over 6 adapters, more than one replica's SLOTS: >= 90% affinity hits."""
    names = ["a0", "a1", "a4", "a5", "a6", "a7"]
    assert len(names) > SLOTS
    with Client(cluster.address, timeout=60, api_key=cluster.keys["acme"]) as client:
        for name in names[2:]:
            client.upload_adapter(cluster.adapters / name, name)
        hits0 = cluster.metric_sum("peftserve_routed_requests", affinity="hit")
        total0 = cluster.metric_sum("peftserve_routed_requests")
        rng = random.Random(7)
        weights = [1 / (rank + 1) ** 1.2 for rank in range(len(names))]
        trace = rng.choices(names, weights, k=120)
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda name: client.generate("Hi there", adapter_id=name, max_new_tokens=2), trace))
        hits = cluster.metric_sum("peftserve_routed_requests", affinity="hit") - hits0
        total = cluster.metric_sum("peftserve_routed_requests") - total0
    assert total == len(trace)
    assert hits / total >= 0.9, f"affinity {hits / total:.2f}"


def _openai(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


def _upload_over_http(url: str, adapter_id: str, directory: Path, key: str | None = None) -> httpx2.Response:
    """POST /v1/adapters/{id} with the PEFT files as multipart parts, as curl -F file=@... sends them."""
    files = [("file", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx2.post(f"{url}/v1/adapters/{adapter_id}", files=files, headers=headers, timeout=60)


def test_http_upload_then_greedy_output_equals_one_server_and_grpc(cluster: Cluster, single: Single) -> None:
    created = _upload_over_http(cluster.http_url, "h2", cluster.adapters / "a2", cluster.keys["acme"])
    assert created.status_code == 201, created.text
    assert (created.json()["adapter_id"], created.json()["version"]) == ("acme/h2", "v1")
    assert _upload_over_http(single.http_url, "acme/h2", cluster.adapters / "a2").status_code == 201
    remote, local = _openai(cluster.http_url, cluster.keys["acme"]), _openai(single.http_url, "local")
    texts = {}
    with Client(cluster.address, timeout=60, api_key=cluster.keys["acme"]) as over_grpc:
        for model, adapter in (("default", None), ("acme/h2", "acme/h2")):
            for prompt in PROMPTS[:2]:
                got = remote.completions.create(model=model, prompt=prompt, **GREEDY)
                want = local.completions.create(model=model, prompt=prompt, **GREEDY)
                grpc_result = over_grpc.generate(
                    prompt, adapter_id=adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True
                )
                assert got.choices[0].text == want.choices[0].text == grpc_result.text
                assert got.usage == want.usage and got.usage.prompt_tokens == grpc_result.prompt_tokens
                texts[model, prompt] = got.choices[0].text
    assert texts["default", PROMPTS[0]] != texts["acme/h2", PROMPTS[0]]  # the adapter is in use


def test_http_streamed_chat_equals_one_server(cluster: Cluster, single: Single) -> None:
    remote, local = _openai(cluster.http_url, cluster.keys["acme"]), _openai(single.http_url, "local")
    messages = [{"role": "user", "content": "Do you ship abroad?"}]
    whole = local.chat.completions.create(model="default", messages=messages, **GREEDY)
    chunks = list(
        remote.chat.completions.create(
            model="default",
            messages=messages,
            stream=True,
            stream_options={"include_usage": True},
            **GREEDY,
        )
    )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 2 and content == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_http_stream_abandoned_by_its_client_is_cancelled_on_its_replica(cluster: Cluster) -> None:
    metrics_url = f"{cluster.http_url}/metrics"  # the HTTP port serves the replicas' metrics too
    cancelled = cluster.metric_sum("peftserve_requests", metrics_url, status="CANCELLED")
    body = {"model": "default", "prompt": "Tell me", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    headers = {"authorization": f"Bearer {cluster.keys['acme']}"}
    read = 20
    with httpx2.Client(base_url=cluster.http_url, headers=headers, timeout=60) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            events = (line for line in response.iter_lines() if line.startswith("data: "))
            arrivals = [time.monotonic() for _, _ in zip(range(read), events, strict=False)]
            assert cluster.metric_sum("peftserve_running_requests", metrics_url) == 1
        left = time.monotonic()
    while cluster.metric_sum("peftserve_requests", metrics_url, status="CANCELLED") == cancelled:
        assert time.monotonic() < left + 30, "the replica never cancelled the request"
        time.sleep(0.05)
    freed_after = time.monotonic() - left
    assert cluster.metric_sum("peftserve_running_requests", metrics_url) == 0
    # cancelled, not finished: the rest of its tokens would have taken far longer
    rest = (body["max_tokens"] - read) * (arrivals[-1] - arrivals[4]) / (read - 5)
    assert freed_after < rest / 4, (freed_after, rest)


def _refusals(call) -> tuple[int, str]:
    try:
        call()
    except openai.APIStatusError as e:
        return e.status_code, e.body["message"]
    raise AssertionError("the call succeeded")


def test_http_models_errors_and_keys_read_as_over_grpc(cluster: Cluster) -> None:
    acme_key = cluster.keys["acme"]
    acme, globex = _openai(cluster.http_url, acme_key), _openai(cluster.http_url, cluster.keys["globex"])
    with (
        Client(cluster.address, timeout=60, api_key=acme_key) as over_grpc,
        Client(cluster.address, timeout=60, api_key=cluster.keys["globex"]) as globex_grpc,
    ):
        over_grpc.upload_adapter(cluster.adapters / "a3", "m3")
        listed = {"default"} | {s.manifest.adapter_id for s in over_grpc.iter_adapters()}
        assert {m.id for m in acme.models.list()} == listed and "acme/m3" in listed
        assert [m.id for m in globex.models.list()] == ["default"]  # acme's adapters are not listed
        http_refusals = [
            _refusals(lambda: acme.completions.create(model="acme/nothing", prompt="Hi")),
            _refusals(lambda: acme.completions.create(model="default", prompt="Hi", top_p=1.5)),
            _refusals(lambda: acme.completions.create(model="default", prompt="Hi", max_tokens=0)),
            _refusals(lambda: globex.completions.create(model="acme/m3", prompt="Hi")),
        ]
        grpc_messages = [
            _failure(lambda: over_grpc.generate("Hi", adapter_id="acme/nothing"))[1],
            _failure(lambda: over_grpc.generate("Hi", top_p=1.5))[1],
            _failure(lambda: over_grpc.generate("Hi", max_new_tokens=0))[1],
            _failure(lambda: globex_grpc.generate("Hi", adapter_id="acme/m3"))[1],
        ]
    assert [status for status, _ in http_refusals] == [404, 400, 400, 404]
    assert [message for _, message in http_refusals] == grpc_messages

    with httpx2.Client(base_url=cluster.http_url, timeout=60) as http:
        no_key = http.post("/v1/completions", json={"model": "default", "prompt": "Hi"})
        assert no_key.status_code == 401 and "missing API key" in no_key.json()["error"]["message"]
        bad_key = http.get("/v1/models", headers={"authorization": "Bearer psk_000000000000_nope"})
        assert (bad_key.status_code, bad_key.json()["error"]["message"]) == (401, "invalid API key")
        infer_only = {"authorization": f"Bearer {cluster.keys['acme-infer']}"}
        assert http.get("/v1/adapters", headers=infer_only).status_code == 403
        assert http.get("/health").json() == {"status": "SERVING"}  # open to every caller


def test_http_admin_lifecycle_with_a_tar_upload(cluster: Cluster) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(cluster.adapters / "a4", arcname="t4")
    acme = {"authorization": f"Bearer {cluster.keys['acme']}"}
    with httpx2.Client(base_url=f"{cluster.http_url}/v1", headers=acme, timeout=60) as http:
        gzip = {"content-type": "application/gzip"}
        upload = http.post("/adapters/t4", content=buffer.getvalue(), headers=gzip)
        assert (upload.status_code, upload.json()["adapter_id"]) == (201, "acme/t4"), upload.text
        loaded = http.post("/adapters/t4/load", json={"pin": True}).json()
        assert (loaded["tier"], loaded["pinned"]) == ("device", True)
        assert http.get("/adapters/acme/t4").json()["manifest"]["version"] == "v1"
        assert http.get("/models/acme/t4").json()["parent"] == "default"
        assert http.post("/adapters/t4/unload").json()["tier"] == "disk"
        assert http.delete("/adapters/t4").json() == {"adapter_id": "acme/t4", "deleted": True}
        gone = http.post("/completions", json={"model": "acme/t4", "prompt": "Hi", "max_tokens": 1})
        assert (gone.status_code, gone.json()["error"]["code"]) == (404, "not_found")


def test_killed_replica_is_replaced_and_loses_nothing(cluster: Cluster) -> None:
    names = ["k0", "k1", "k2"]
    with Client(cluster.address, timeout=60, api_key=cluster.keys["acme"]) as client:
        for i, name in enumerate(names):
            client.upload_adapter(cluster.adapters / f"a{i}", name)
        before = {name: _greedy(client, PROMPTS[1], adapter_id=name) for name in names}
        replicas = cluster.replicas()
        assert len(replicas) == 2
        outcomes: list[tuple[str, float]] = []
        started = threading.Barrier(7)

        def stream(_: int) -> None:
            try:
                chunks = client.generate_stream("Tell me", max_new_tokens=400, ignore_eos=True)
                next(chunks)
                started.wait(30)
                for _chunk in chunks:
                    pass
                outcomes.append(("OK", time.monotonic()))
            except PeftServeError as e:
                outcomes.append((e.code, time.monotonic()))

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(stream, i) for i in range(6)]
            started.wait(60)
            victim = sorted(replicas.values())[0]
            os.kill(victim, signal.SIGKILL)
            killed_at = time.monotonic()
            for f in futures:
                f.result(timeout=120)
        codes = [code for code, _ in outcomes]
        assert set(codes) <= {"OK", "UNAVAILABLE"} and "UNAVAILABLE" in codes, codes
        following = [_greedy(client, PROMPTS[1], adapter_id=name) for name in names for _ in range(2)]
        deadline = time.monotonic() + 120
        while len(cluster.replicas()) < 3 and time.monotonic() < deadline:
            time.sleep(1)
        replaced = cluster.replicas()
        after = {name: _greedy(client, PROMPTS[1], adapter_id=name) for name in names}
    failed_after_s = [ended - killed_at for code, ended in outcomes if code == "UNAVAILABLE"]
    assert max(failed_after_s) < 10, failed_after_s  # failed fast, not at a timeout
    assert following == [before[name] for name in names for _ in range(2)]
    assert len(replaced) == 3 and victim in replicas.values()
    assert after == before


def test_sigterm_lets_a_stream_in_flight_finish_and_refuses_new_requests(cluster: Cluster) -> None:
    """Stops the cluster: runs last. The stream takes seconds, well within the fixture's --grace-s."""
    acme = _openai(cluster.http_url, cluster.keys["acme"])
    tokens = 600
    stream = acme.completions.create(
        model="default",
        prompt="Tell me",
        max_tokens=tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    next(stream)
    cluster.process.proc.send_signal(signal.SIGTERM)
    with ThreadPoolExecutor(1) as pool:
        rest = pool.submit(list, stream)
        deadline = time.monotonic() + 10
        while True:  # the ingress sees the drain within half a second
            assert time.monotonic() < deadline, "new requests were still admitted"
            try:
                acme.completions.create(model="default", prompt="Hi", max_tokens=1)
            except openai.APIStatusError as e:
                refused = (e.status_code, e.body["message"])
                break
            time.sleep(0.05)
        health = httpx2.get(f"{cluster.http_url}/health", timeout=10)
        assert not rest.done()  # the drain began while the stream was under way
        chunks = rest.result(timeout=60)
    assert refused == (503, "the cluster is shutting down; retry shortly")
    assert (health.status_code, health.json()) == (503, {"status": "NOT_SERVING"})
    assert chunks[-1].usage.completion_tokens == tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert cluster.process.proc.wait(60) == 0
