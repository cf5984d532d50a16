"""Messages that do not decode are INVALID_ARGUMENT with protobuf's reason, on every kind of RPC."""

from __future__ import annotations

import grpc
import pytest

from peftserve_client._proto import peftserve_pb2 as pb

from .conftest import Served

BAD_UTF8 = pb.GenerateRequest(prompt="hi").SerializeToString().replace(b"hi", b"\xff\xfe")
CORRUPT = b"\xff\xff\xff"


def _raw(channel: grpc.Channel, method: str, streaming: str):
    identity = dict(request_serializer=None, response_deserializer=None)
    return getattr(channel, streaming)(method, **identity)


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("/peftserve.v1.Inference/Generate", "unary_unary"),
        ("/peftserve.v1.Inference/GenerateStream", "unary_stream"),
        ("/peftserve.v1.Inference/Tokenize", "unary_unary"),
        ("/peftserve.v1.Adapters/GetAdapter", "unary_unary"),
        ("/peftserve.v1.Adapters/UploadAdapter", "stream_unary"),
    ],
)
@pytest.mark.parametrize(("payload", "reason"), [(BAD_UTF8, "bad UTF-8"), (CORRUPT, "corrupt")])
def test_undecodable_requests_are_invalid_argument(served: Served, method, kind, payload, reason) -> None:
    with grpc.insecure_channel(served.address) as channel:
        call = _raw(channel, method, kind)
        with pytest.raises(grpc.RpcError) as info:
            if kind == "unary_unary":
                call(payload, timeout=5)
            elif kind == "unary_stream":
                list(call(payload, timeout=5))
            else:
                call(iter([payload]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in info.value.details() and "could not be decoded" in info.value.details()
    assert not served.engine.requests


def test_the_server_keeps_serving_afterwards(served: Served) -> None:
    from peftserve_client import Client

    with grpc.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.RpcError):
            _raw(channel, "/peftserve.v1.Inference/Generate", "unary_unary")(BAD_UTF8, timeout=5)
    with Client(served.address, timeout=5) as client:
        assert client.generate("ok", max_new_tokens=2).text
