"""Blocking client of the peftserve gRPC API."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from peftserve_client import _core
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client._proto import peftserve_pb2_grpc as pb_grpc
from peftserve_client.errors import from_rpc_error
from peftserve_client.types import GenerateResult, ModelInfo, StreamChunk, TokenizeResult

if TYPE_CHECKING:
    from typing_extensions import Unpack


class Client:
    """Talks to one peftserve server; use as a context manager or call close()."""

    def __init__(self, address: str, timeout: float | None = None, api_key: str | None = None) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.InferenceStub(self._channel)
        self._health_check = self._channel.unary_unary(
            _core.HEALTH_CHECK_METHOD,
            request_serializer=_core.HEALTH_REQUEST.SerializeToString,
            response_deserializer=_core.HEALTH_RESPONSE.FromString,
        )
        self._timeout = timeout
        self._metadata = _core.metadata(api_key)

    def generate(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[_core.GenerateOptions],
    ) -> GenerateResult:
        """Generate a completion and return it whole."""
        request = _core.build_generate_request(prompt, options)
        try:
            response = self._stub.Generate(request, **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _core.to_generate_result(response)

    def generate_stream(
        self,
        prompt: str | None = None,
        *,
        timeout: float | None = None,
        **options: Unpack[_core.GenerateOptions],
    ) -> Iterator[StreamChunk]:
        """Generate a completion as chunks; leaving the loop early cancels the request."""
        request = _core.build_generate_request(prompt, options)
        call = self._stub.GenerateStream(request, **self._call_kwargs(timeout))
        try:
            for response in call:
                yield _core.to_stream_chunk(response)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        finally:
            call.cancel()

    def tokenize(self, text: str, *, timeout: float | None = None) -> TokenizeResult:
        """Token ids of text under the served model's tokenizer."""
        try:
            response = self._stub.Tokenize(pb.TokenizeRequest(text=text), **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _core.to_tokenize_result(response)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served base model and the server's limits."""
        try:
            response = self._stub.ModelInfo(pb.ModelInfoRequest(), **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _core.to_model_info(response)

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status of service ('' is the whole server), e.g. 'SERVING'."""
        try:
            response = self._health_check(_core.HEALTH_REQUEST(value=service), **self._call_kwargs(timeout))
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return _core.serving_status_name(response)

    def close(self) -> None:
        """Close the channel; in-flight calls are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _call_kwargs(self, timeout: float | None) -> dict:
        return {"timeout": _core.deadline(timeout, self._timeout), "metadata": self._metadata}
