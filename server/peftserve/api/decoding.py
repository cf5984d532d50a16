"""Requests that do not decode (invalid UTF-8 in a string field, corrupt bytes) answer INVALID_ARGUMENT.

grpcio answers a failing request deserializer itself, with a status the caller cannot act on. So the
services are registered with a deserializer that never raises: what does not decode becomes an
``Undecodable`` value, and the handler ends the call with INVALID_ARGUMENT and protobuf's reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from peftserve.errors import InvalidRequest

Registrar = Callable[[Any, grpc.aio.Server], None]
"""A generated add_<Service>Servicer_to_server function."""


@dataclass(frozen=True)
class Undecodable:
    """A request message that failed to decode, and protobuf's reason."""

    reason: str

    def error(self) -> InvalidRequest:
        return InvalidRequest(
            f"the request message could not be decoded ({self.reason}); send valid protobuf"
        )


def _decoder(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def decode(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:  # string fields with bad UTF-8 raise it too
            return Undecodable(str(exc))

    return decode


def _guard(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same handler, answering an Undecodable request with INVALID_ARGUMENT."""
    decode = _decoder(handler.request_deserializer)
    serialize = handler.response_serializer

    if handler.request_streaming:

        async def checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
            async for request in requests:
                if isinstance(request, Undecodable):
                    raise request.error()  # the servicer maps it to its status
                yield request

        if handler.stream_unary is not None:
            stream_unary = handler.stream_unary

            async def client_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
                return await stream_unary(checked(requests), context)

            return grpc.stream_unary_rpc_method_handler(
                client_stream, request_deserializer=decode, response_serializer=serialize
            )
        stream_stream = handler.stream_stream

        async def bidi(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            async for response in stream_stream(checked(requests), context):
                yield response

        return grpc.stream_stream_rpc_method_handler(
            bidi, request_deserializer=decode, response_serializer=serialize
        )

    if handler.unary_stream:
        stream_behavior = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
            async for response in stream_behavior(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(
            unary_stream, request_deserializer=decode, response_serializer=serialize
        )

    unary_behavior = handler.unary_unary

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Undecodable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(request.error()))
        return await unary_behavior(request, context)

    return grpc.unary_unary_rpc_method_handler(
        unary, request_deserializer=decode, response_serializer=serialize
    )


class _Capture:
    """Stands in for the server while a generated registrar hands over its method handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        """The registrar also passes a generic handler of the same methods; the registered ones suffice."""

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.services[service] = handlers


def add_guarded(registrar: Registrar, servicer: object, server: grpc.aio.Server) -> None:
    """registrar(servicer, server), with every method answering undecodable requests INVALID_ARGUMENT."""
    capture = _Capture()
    registrar(servicer, capture)
    for service, handlers in capture.services.items():
        guarded = {name: _guard(handler) for name, handler in handlers.items()}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, guarded),))
        server.add_registered_method_handlers(service, guarded)
