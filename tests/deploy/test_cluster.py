"""`peftserve cluster` end to end: two replicas on a local Ray cluster, the same SDK as one server.

Kept in one module so the cluster starts once (about half a minute on two cores); the replica kill
runs last.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from peftserve.bench.server import ServerProcess
from peftserve_client import Client
from peftserve_client.errors import PeftServeError

from .conftest import SLOTS, Cluster

pytestmark = pytest.mark.slow

PROMPTS = ("Hello, my name is", "Once upon a time", "The capital of France")
NEW_TOKENS = 12


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


def test_greedy_output_and_errors_equal_one_server(cluster: Cluster, tmp_path: Path) -> None:
    single = ServerProcess.serve(["--threads", "1", "--store", str(tmp_path / "store")])
    try:
        single_address = single.wait_ready(120)
        with (
            Client(cluster.address, timeout=60, api_key=cluster.keys["acme"]) as remote,
            Client(single_address, timeout=60) as local,
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
            assert remote.health() == "SERVING"
            failures = [_failure(call) for call in _bad_calls(remote)]
            assert failures == [_failure(call) for call in _bad_calls(local)]
        assert all(code != "INTERNAL" for code, _ in failures)
    finally:
        single.stop()


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
