"""The HTTP API on the wire (httpx2, no openai client): SSE framing, error bodies, disconnects, limits."""

from __future__ import annotations

import json
import time

import httpx2
import pytest

from peftserve.api.http.app import MAX_REQUEST_BYTES
from peftserve.errors import EngineFailure

from .conftest import Served

COMPLETION = {"model": "fake", "prompt": "abc", "max_tokens": 4}


def events(body: bytes) -> list[str]:
    """The data of each event; asserts every event is exactly one `data: ...` line."""
    text = body.decode()
    assert text.endswith("\n\n"), text[-40:]
    blocks = text[:-2].split("\n\n")
    for block in blocks:
        assert block.startswith("data: ") and "\n" not in block, block
    return [block.removeprefix("data: ") for block in blocks]


def wait_until(condition, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_sse_framing_of_a_streamed_completion(local: Served) -> None:
    body = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    with httpx2.Client(base_url=local.base_url) as http:
        response = http.post("/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    data = events(response.content)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert [c["choices"][0]["text"] for c in chunks[:-1]] == list("abca")
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "text_completion" for c in chunks)
    assert [c["usage"] for c in chunks[:-1]] == [None] * 4
    assert chunks[-1]["choices"] == []
    usage = {
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert chunks[-1]["usage"] == usage


def test_errors_before_the_stream_are_plain_http_errors(local: Served) -> None:
    with httpx2.Client(base_url=local.base_url) as http:
        response = http.post("/completions", json={**COMPLETION, "model": "nope", "stream": True})
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {
            "message": "adapter 'default/nope' not found",
            "type": "not_found_error",
            "param": None,
            "code": "not_found",
        }
    }


def test_a_failure_mid_stream_is_an_error_event_then_done(local: Served) -> None:
    local.engine.fail_mid_stream = EngineFailure("the engine failed while running this request")
    with httpx2.Client(base_url=local.base_url) as http:
        response = http.post("/completions", json={**COMPLETION, "stream": True})
    data = events(response.content)
    assert response.status_code == 200 and data[-1] == "[DONE]"
    first, error = json.loads(data[0]), json.loads(data[1])
    assert first["choices"][0]["text"] == "a"
    assert error["error"]["message"] == "the engine failed while running this request"
    assert error["error"]["code"] == "internal" and len(data) == 3


def test_a_client_leaving_mid_stream_cancels_its_request(local: Served) -> None:
    local.engine.token_delay_s = 0.02
    cancelled = requests_total(local, "CANCELLED")
    with httpx2.Client(base_url=local.base_url) as http:
        with http.stream("POST", "/completions", json={**COMPLETION, "max_tokens": 60, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    wait_until(lambda: local.engine.aborted)
    assert local.engine.running == 0
    (request,) = local.engine.requests
    assert local.engine.aborted == [request.request_id]
    wait_until(lambda: requests_total(local, "CANCELLED") == cancelled + 1)


def test_a_client_leaving_before_a_whole_response_cancels_it(local: Served) -> None:
    local.engine.token_delay_s = 0.02
    with httpx2.Client(base_url=local.base_url, timeout=0.3) as http, pytest.raises(httpx2.ReadTimeout):
        http.post("/completions", json={**COMPLETION, "max_tokens": 60})
    wait_until(lambda: local.engine.aborted)
    assert local.engine.running == 0


def test_bodies_over_the_limit_are_413(local: Served) -> None:
    big = json.dumps({**COMPLETION, "prompt": "x" * MAX_REQUEST_BYTES}).encode()
    with httpx2.Client(base_url=local.base_url) as http:
        declared = http.post("/completions", content=big, headers={"content-type": "application/json"})
        chunked = http.post(
            "/completions",
            content=(big[i : i + 65536] for i in range(0, len(big), 65536)),
            headers={"content-type": "application/json"},
        )
    # refused from its Content-Length before it is read (Starlette's limiter answers in plain text),
    # or while it arrives (then in the API's error shape)
    assert declared.status_code == 413
    assert chunked.status_code == 413 and chunked.json()["error"]["type"] == "invalid_request_error"
    assert local.engine.requests == []


@pytest.mark.parametrize(
    ("body", "param", "text"),
    [
        (b"{not json", "body", "not valid JSON"),
        (b'{"model": "fake"}', "prompt", "prompt is required"),
        (b'{"model": "fake", "prompt": "x", "max_tokens": "many"}', "max_tokens", "max_tokens:"),
        (b'{"model": "fake", "prompt": ["a", "b"]}', None, "one prompt per request"),
    ],
)
def test_bad_bodies_are_400_in_openai_shape(local: Served, body: bytes, param: str | None, text: str) -> None:
    with httpx2.Client(base_url=local.base_url) as http:
        response = http.post("/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and text in error["message"]


def requests_total(s: Served, status: str) -> float:
    """peftserve_requests_total{status} of the server's /metrics (shared by a module's tests)."""
    prefix = f'peftserve_requests_total{{status="{status}"}} '
    lines = httpx2.get(f"{s.http.url}/metrics").text.splitlines()
    return next((float(line.removeprefix(prefix)) for line in lines if line.startswith(prefix)), 0.0)


def test_health_metrics_and_unknown_routes(local: Served) -> None:
    with httpx2.Client(base_url=local.http.url) as http:
        assert http.get("/health").json() == {"status": "SERVING"}
        local.call(local.health.mark_not_serving())
        response = http.get("/health")
        assert (response.status_code, response.json()) == (503, {"status": "NOT_SERVING"})
        before = requests_total(local, "OK")
        http.post("/v1/completions", json=COMPLETION)
        assert requests_total(local, "OK") == before + 1
        missing = http.get("/v2/nothing")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_the_key_as_bearer_or_as_x_api_key(with_keys: Served) -> None:
    key = with_keys.api_keys["acme"]
    refused = requests_total(with_keys, "UNAUTHENTICATED")
    with httpx2.Client(base_url=with_keys.base_url) as http:
        assert http.post("/completions", json=COMPLETION, headers={"x-api-key": key}).status_code == 200
        bearer = {"authorization": f"Bearer {key}"}
        assert http.post("/completions", json=COMPLETION, headers=bearer).status_code == 200
        missing = http.post("/completions", json=COMPLETION)
        assert missing.status_code == 401 and "Authorization: Bearer" in missing.json()["error"]["message"]
        assert http.get("/models").status_code == 401
    assert requests_total(with_keys, "UNAUTHENTICATED") == refused + 1  # /models is not a generation
