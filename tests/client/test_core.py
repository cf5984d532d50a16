"""Request building, result conversion and error mapping shared by Client and AsyncClient."""

from __future__ import annotations

import math

import grpc
import pytest

from peftserve_client import (
    FinishReason,
    GenerateResult,
    InternalError,
    InvalidArgument,
    NotFound,
    PeftServeError,
    StreamChunk,
    Usage,
    _core,
)
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client.errors import _BY_CODE, from_rpc_error


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str | None) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str | None:
        return self._details


def test_unset_options_stay_unset_on_the_wire() -> None:
    msg = _core.build_generate_request("hi", {})
    assert msg.prompt == "hi" and not msg.adapter_id and not msg.adapters
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty"):
        assert not msg.sampling.HasField(name), name


def test_options_are_copied() -> None:
    msg = _core.build_generate_request(
        None,
        {
            "prompt_token_ids": [1, 2],
            "adapters": [("a", 0.25), ("b", 0.75)],
            "max_new_tokens": 0,
            "temperature": 0.0,
            "seed": 2**64 - 1,
            "stop": "END",
            "stop_token_ids": (5,),
            "ignore_eos": True,
            "logprobs": True,
        },
    )
    assert list(msg.prompt_token_ids) == [1, 2]
    assert [(a.adapter_id, a.weight) for a in msg.adapters] == [("a", 0.25), ("b", 0.75)]
    s = msg.sampling
    assert s.HasField("max_new_tokens") and s.max_new_tokens == 0 and s.HasField("temperature")
    assert s.seed == 2**64 - 1 and list(s.stop) == ["END"] and list(s.stop_token_ids) == [5]
    assert s.ignore_eos and s.logprobs


def test_mixture_as_dict_and_non_finite_weight() -> None:
    msg = _core.build_generate_request("p", {"adapters": {"a": 1.0}})
    assert msg.adapters[0].adapter_id == "a"
    with pytest.raises(ValueError, match="finite"):
        _core.build_generate_request("p", {"adapters": {"a": math.nan}})


def test_unknown_option_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="max_tokens"):
        _core.build_generate_request("p", {"max_tokens": 3})  # type: ignore[typeddict-unknown-key]


def test_api_key_metadata() -> None:
    assert _core.metadata("k") == (("x-api-key", "k"),)
    assert _core.metadata(None) == ()


def test_stream_chunks_merge_into_a_result() -> None:
    first = _core.to_stream_chunk(pb.GenerateStreamResponse(request_id="r", text="a", token_ids=[1]))
    last = _core.to_stream_chunk(
        pb.GenerateStreamResponse(
            request_id="r",
            text="b",
            token_ids=[2],
            finish_reason=pb.FINISH_REASON_EOS,
            usage=pb.Usage(prompt_tokens=4, completion_tokens=2),
        )
    )
    assert first == StreamChunk("r", "a", (1,)) and not first.finished
    merged = GenerateResult.from_chunks([first, last])
    assert merged == GenerateResult("r", "ab", (1, 2), FinishReason.EOS, Usage(4, 2))
    with pytest.raises(ValueError, match="did not finish"):
        GenerateResult.from_chunks([first])


def test_generate_result_from_response() -> None:
    msg = pb.GenerateResponse(
        request_id="r", text="t", token_ids=[9], finish_reason=pb.FINISH_REASON_STOP, logprobs=[-0.25]
    )
    result = _core.to_generate_result(msg)
    assert (result.finish_reason, result.logprobs, result.completion_tokens) == (
        FinishReason.STOP,
        (-0.25,),
        0,
    )
    assert result.finish_reason == "stop"


def test_status_codes_map_to_the_exception_tree() -> None:
    err = from_rpc_error(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "adapter 'x' not found"))
    assert isinstance(err, NotFound) and (err.code, err.message) == ("NOT_FOUND", "adapter 'x' not found")
    assert isinstance(from_rpc_error(_FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT, "bad")), InvalidArgument)
    assert isinstance(from_rpc_error(_FakeRpcError(grpc.StatusCode.UNKNOWN, None)), InternalError)
    unmapped = from_rpc_error(_FakeRpcError(grpc.StatusCode.UNIMPLEMENTED, "no"))
    assert type(unmapped) is PeftServeError and unmapped.code == "UNIMPLEMENTED"
    assert all(issubclass(klass, PeftServeError) for klass in _BY_CODE.values())


def test_health_codec_reads_serving_status() -> None:
    assert _core.serving_status_name(_core.HEALTH_RESPONSE(value=1)) == "SERVING"
    assert _core.serving_status_name(_core.HEALTH_RESPONSE(value=99)) == "UNKNOWN"
    assert _core.HEALTH_REQUEST(value="").SerializeToString() == b""
