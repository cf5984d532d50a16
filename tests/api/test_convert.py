"""protobuf ⇄ domain conversion and the proto-level checks."""

from __future__ import annotations

from dataclasses import replace

import pytest

from peftserve.api import adapter_ids, convert
from peftserve.auth import LOCAL_CALLER
from peftserve.engine.protocol import AdapterStatus, ModelInfo, PrefixCacheStats
from peftserve.engine.request import AdapterRef, FinishReason, RequestOutput, SamplingParams
from peftserve.errors import InvalidRequest
from peftserve.store.manifest import AdapterManifest, FileEntry
from peftserve_client import Usage
from peftserve_client._core import to_adapter_manifest, to_generate_result, to_model_info, to_stream_chunk
from peftserve_client._proto import peftserve_pb2 as pb


def _out(text: str, tokens: tuple[int, ...], n: int, reason: FinishReason | None = None) -> RequestOutput:
    return RequestOutput("r1", text, tokens, (-1.0,) * len(tokens), 3, n, reason)


def test_unset_sampling_fields_take_the_defaults() -> None:
    assert convert.to_sampling_params(pb.SamplingParams()) == SamplingParams()


def test_set_sampling_fields_are_kept_and_floats_read_as_written() -> None:
    msg = pb.SamplingParams(
        max_new_tokens=5, temperature=0.7, top_k=0, top_p=0.9, seed=2**63, stop=["\n"], logprobs=True
    )
    params = convert.to_sampling_params(msg)
    assert (params.max_new_tokens, params.temperature, params.top_p, params.seed) == (5, 0.7, 0.9, 2**63)
    assert params.top_k == 0 and params.stop == ("\n",) and params.logprobs


def test_explicit_zero_is_not_the_default() -> None:
    assert convert.to_sampling_params(pb.SamplingParams(max_new_tokens=0)).max_new_tokens == 0


def _local(text: str) -> str:
    return adapter_ids.resolve(text, LOCAL_CALLER)


def test_request_with_prompt_and_adapter_by_full_id() -> None:
    msg = pb.GenerateRequest(prompt="hi", adapter_id="a", request_id="x")
    req = convert.to_generation_request(msg, _local)
    assert req.request_id == "x" and req.prompt == "hi" and req.prompt_token_ids is None
    assert req.adapters == (AdapterRef("default/a"),)


def test_request_id_is_generated_when_absent() -> None:
    a = convert.to_generation_request(pb.GenerateRequest(prompt_token_ids=[1, 2]), _local)
    b = convert.to_generation_request(pb.GenerateRequest(prompt_token_ids=[1, 2]), _local)
    assert a.request_id and a.request_id != b.request_id and a.prompt_token_ids == [1, 2]


def test_mixture_keeps_weights_and_version_pins() -> None:
    weights = [pb.AdapterWeight(adapter_id="a", weight=0.3), pb.AdapterWeight(adapter_id="t/b@v2", weight=1)]
    msg = pb.GenerateRequest(prompt="p", adapters=weights)
    refs = convert.to_generation_request(msg, _local).adapters
    assert refs == (AdapterRef("default/a", 0.3), AdapterRef("t/b@v2", 1.0))


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (pb.GenerateRequest(), "prompt must not be empty"),
        (pb.GenerateRequest(prompt="a", prompt_token_ids=[1]), "not both"),
        (
            pb.GenerateRequest(prompt="a", adapter_id="x", adapters=[pb.AdapterWeight(adapter_id="y")]),
            "not both",
        ),
        (pb.GenerateRequest(prompt="a", adapters=[pb.AdapterWeight(weight=1.0)]), "adapter_id"),
        (pb.GenerateRequest(prompt="a", adapter_id="../etc"), "not valid"),
        (pb.GenerateRequest(prompt="a", adapters=[pb.AdapterWeight(adapter_id="y")] * 9), "at most 8"),
        (pb.GenerateRequest(prompt="a", request_id="r" * 200), "request_id"),
    ],
)
def test_malformed_requests_are_invalid(msg: pb.GenerateRequest, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match):
        convert.to_generation_request(msg, _local)


def test_generate_response_merges_increments() -> None:
    outputs = [_out("ab", (1, 2), 2), _out("c", (3,), 3, FinishReason.LENGTH)]
    msg = convert.to_generate_response("r1", outputs)
    assert (msg.text, list(msg.token_ids), list(msg.logprobs)) == ("abc", [1, 2, 3], [-1.0] * 3)
    assert msg.finish_reason == pb.FINISH_REASON_LENGTH
    assert (msg.usage.prompt_tokens, msg.usage.completion_tokens) == (3, 3)


def test_stream_response_has_usage_on_the_last_message_only() -> None:
    first = convert.to_stream_response(_out("a", (1,), 1))
    last = convert.to_stream_response(_out("b", (2,), 2, FinishReason.EOS))
    assert not first.HasField("usage") and first.finish_reason == pb.FINISH_REASON_UNSPECIFIED
    assert last.HasField("usage") and last.finish_reason == pb.FINISH_REASON_EOS


def test_every_finish_reason_has_a_wire_value() -> None:
    for reason in FinishReason:
        if reason is FinishReason.ERROR:  # reaches the caller as an error status (AsyncEngine raises it)
            continue
        assert convert.to_stream_response(_out("", (), 0, reason)).finish_reason != 0


def test_status_message_mirrors_the_domain_status() -> None:
    manifest = AdapterManifest(
        adapter_id="acme/x",
        version="v3",
        kind="lora",
        peft_type="LORA",
        base_fingerprint="llama-64",
        ranks=(4, 8),
        target_modules=("q_proj", "v_proj"),
        num_virtual_tokens=0,
        nbytes=12,
        files=(FileEntry("adapter_config.json", 12, "ab" * 32),),
        created_at=1700000000.5,
        device_bytes=4096,
        shared_bytes=64,
        forms=(("dense", 3), ("low_rank", 11)),
        needs_max_rank=43,
    )
    msg = convert.to_status_message(AdapterStatus(manifest, "host", pinned=True, active_requests=2))
    assert (msg.tier, msg.pinned, msg.active_requests) == (pb.RESIDENCY_TIER_HOST, True, 2)
    m = msg.manifest
    assert (m.adapter_id, m.version, list(m.ranks), list(m.target_modules)) == (
        "acme/x",
        "v3",
        [4, 8],
        ["q_proj", "v_proj"],
    )
    assert (m.files[0].name, m.files[0].size, m.created_at) == ("adapter_config.json", 12, 1700000000.5)
    assert (m.device_bytes, m.shared_bytes, dict(m.forms), m.needs_max_rank) == (
        4096,
        64,
        {"dense": 3, "low_rank": 11},
        43,
    )
    client_side = to_adapter_manifest(m)  # what the SDK hands its caller
    assert (client_side.forms, client_side.device_bytes) == ((("dense", 3), ("low_rank", 11)), 4096)


@pytest.mark.parametrize(("requested", "used"), [(0, 100), (1, 1), (1000, 1000), (5000, 1000)])
def test_page_size_defaults_and_caps(requested: int, used: int) -> None:
    assert convert.page_size(requested) == used


def test_model_info_carries_the_prefix_cache_counters_when_known() -> None:
    info = ModelInfo("m", "llama", 320, 512, 256, "float32", "cpu", 2, 64, 100, 16, (2,))
    assert to_model_info(convert.to_model_info_response(info)).prefix_cache is None  # a cluster's
    stats = PrefixCacheStats(enabled=True, query_tokens=400, hit_tokens=300, cached_blocks=7, evictions=2)
    got = to_model_info(convert.to_model_info_response(replace(info, prefix_cache=stats))).prefix_cache
    assert (got.enabled, got.query_tokens, got.hit_tokens, got.cached_blocks, got.evictions) == (
        True,
        400,
        300,
        7,
        2,
    )
    assert got.hit_rate == 0.75


def test_usage_carries_the_cached_prompt_tokens() -> None:
    last = replace(_out("b", (2,), 2, FinishReason.LENGTH), cached_tokens=16)
    assert to_stream_chunk(convert.to_stream_response(last)).usage.cached_tokens == 16
    whole = convert.to_generate_response("r1", [_out("a", (1,), 1), last])
    assert to_generate_result(whole).usage == Usage(prompt_tokens=3, completion_tokens=2, cached_tokens=16)
