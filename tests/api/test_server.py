"""Health, reflection and the metrics endpoint of a server built by create_server."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from peftserve.api.health import INFERENCE_SERVICE
from peftserve.metrics import start_metrics_server
from peftserve_client import Client, InvalidArgument

from .conftest import Served


def test_health_is_not_serving_until_marked_and_after_drain(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        assert client.health() == "NOT_SERVING"
        served.call(served.health.mark_serving())
        assert client.health() == "SERVING"
        assert client.health(INFERENCE_SERVICE) == "SERVING"
        served.call(served.health.mark_not_serving())
        assert client.health() == "NOT_SERVING"


def test_reflection_lists_the_services(served: Served) -> None:
    with grpc.insecure_channel(served.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {
        "peftserve.v1.Inference",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


def test_metrics_endpoint_serves_request_and_engine_metrics(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        client.generate("hello", max_new_tokens=3)
        list(client.generate_stream("hello", max_new_tokens=2))
        with pytest.raises(InvalidArgument):
            client.generate("hello", top_k=-1)
    http = start_metrics_server(0, served.metrics.registry, host="127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http.server_port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        http.shutdown()
    assert 'peftserve_requests_total{status="OK"} 2.0' in body
    assert 'peftserve_requests_total{status="INVALID_ARGUMENT"} 1.0' in body
    assert "peftserve_prompt_tokens_total 10.0" in body
    assert "peftserve_generation_tokens_total 5.0" in body
    assert "peftserve_time_to_first_token_seconds_count 2.0" in body
    assert "peftserve_time_per_output_token_seconds_count 2.0" in body
    assert "peftserve_request_duration_seconds_count 3.0" in body
    for gauge in ("queue_depth", "running_requests", "kv_blocks_used", "kv_blocks_free", "warming"):
        assert f"peftserve_{gauge} " in body
    assert "peftserve_kv_blocks_free 7.0" in body and "peftserve_warming 2.0" in body
