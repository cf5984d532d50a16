"""The Inference servicer: infer scope, protobuf in, engine call, protobuf out; errors by api/status.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc

from peftserve.api import adapter_ids, convert
from peftserve.api.status import abort, code_of
from peftserve.auth import Authenticator, Caller, Scope
from peftserve.engine.protocol import EngineClient
from peftserve.engine.request import RequestOutput
from peftserve.metrics import RequestTrace, ServerMetrics
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client._proto import peftserve_pb2_grpc as pb_grpc


def _interrupted_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a handler was cancelled: its deadline passed, or the client went away."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class InferenceServicer(pb_grpc.InferenceServicer):
    """Serves peftserve.v1.Inference on top of an EngineClient."""

    def __init__(
        self,
        engine: EngineClient,
        metrics: ServerMetrics | None = None,
        auth: Authenticator | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics if metrics is not None else ServerMetrics()
        self._auth = auth if auth is not None else Authenticator()

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        """Collect every increment of the request into one response."""
        async with contextlib.aclosing(self._run(request, context)) as stream:
            outputs = [output async for output in stream]
        request_id = outputs[-1].request_id if outputs else request.request_id
        return convert.to_generate_response(request_id, outputs)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """One message per engine increment."""
        async with contextlib.aclosing(self._run(request, context)) as stream:
            async for output in stream:
                yield convert.to_stream_response(output)

    async def Tokenize(
        self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TokenizeResponse:
        """Token ids of the text and the text of each token."""
        try:
            self._caller(context)
            token_ids = self._engine.tokenize(request.text)
            return convert.to_tokenize_response(token_ids, self._engine.token_strings(token_ids))
        except Exception as e:
            await abort(context, e)

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        """The served model and the engine's limits."""
        try:
            self._caller(context)
            return convert.to_model_info_response(self._engine.model_info)
        except Exception as e:
            await abort(context, e)

    async def _run(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[RequestOutput]:
        """Run one request on the engine, record its metrics, and always close the engine's stream.

        Closing the stream is what makes the engine abort a request whose caller cancelled it or
        whose deadline passed, and free its KV blocks.
        """
        trace = RequestTrace()
        status = grpc.StatusCode.OK
        outputs: AsyncIterator[RequestOutput] | None = None
        try:
            caller = self._caller(context)
            generation = convert.to_generation_request(
                request, lambda text: adapter_ids.resolve(text, caller), caller.tenant, caller.limits
            )
            outputs = self._engine.generate(generation)
            async for output in outputs:
                trace.observe(output)
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            status = _interrupted_status(context)
            raise
        except Exception as e:
            status = code_of(e)
            await abort(context, e)
        finally:
            aclose = getattr(outputs, "aclose", None)
            if aclose is not None:
                await aclose()
            self._metrics.record(trace, status.name)

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """Every Inference RPC needs the infer scope."""
        return self._auth.authorize(context.invocation_metadata(), Scope.INFER)
