"""The OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models (infer scope)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from peftserve.api import adapter_ids, convert
from peftserve.api.http import translate
from peftserve.api.http.front import HttpFront
from peftserve.api.http.schemas import ChatCompletionRequest, CompletionRequest
from peftserve.api.http.streaming import ClientGone, event_stream, outputs, until_disconnected
from peftserve.api.status import code_of
from peftserve.auth import Caller, Scope
from peftserve.engine.protocol import AdapterAdmin, AdapterStatus, ModelInfo
from peftserve.engine.request import GenerationRequest, RequestOutput
from peftserve.errors import AdapterNotFound, quote
from peftserve.metrics import RequestTrace

CLIENT_CLOSED_REQUEST = 499
"""Logged for a request whose client left before its response started (nobody receives it)."""

Build = Callable[[Caller], tuple[GenerationRequest, translate.Target]]


async def _collect(stream: AsyncIterator[RequestOutput]) -> list[RequestOutput]:
    async with contextlib.aclosing(stream):
        return [output async for output in stream]


def _base_model(info: ModelInfo, created: int) -> dict[str, Any]:
    return {
        "id": info.model_id,
        "object": "model",
        "created": created,
        "owned_by": "peftserve",
        "parent": None,
        "max_model_len": info.max_context,
    }


def _adapter_model(status: AdapterStatus, info: ModelInfo) -> dict[str, Any]:
    manifest = status.manifest
    return {
        "id": manifest.adapter_id,
        "object": "model",
        "created": int(manifest.created_at),
        "owned_by": manifest.adapter_id.partition("/")[0],
        "parent": info.model_id,
        "max_model_len": info.max_context,
    }


async def _all_adapters(admin: AdapterAdmin, tenant: str | None) -> list[AdapterStatus]:
    """Every adapter of the tenant (of every tenant when None), page after page."""
    statuses, token = [], ""
    while True:
        page, token = await admin.list(tenant, convert.MAX_PAGE_SIZE, token)
        statuses += page
        if not token:
            return statuses


def inference_router(front: HttpFront) -> APIRouter:
    """The routes a user of the openai client calls, over the front's engine."""
    router = APIRouter(prefix="/v1", tags=["inference"])

    async def generate(
        request: Request, build: Build, writer_class: type[translate.Writer], stream: bool, usage: bool
    ) -> Response:
        """Run one request: a whole JSON response, or server-sent events once the first output is there.

        Errors before the first output (bad key, unknown adapter, bad values, full queue) are plain HTTP
        errors with their status, never a 200 stream carrying an error.
        """
        trace = RequestTrace()
        try:
            generation, target = build(front.caller(request.headers, Scope.INFER))
        except Exception as e:
            front.metrics.record(trace, code_of(e).name)
            raise
        writer = writer_class(generation.request_id, target.model, front.engine.token_strings)
        increments = outputs(front.engine, front.metrics, generation, trace)
        try:
            if not stream:
                collected = await until_disconnected(request, _collect(increments))
                return JSONResponse(writer.response(collected))
            first = await until_disconnected(request, anext(increments))
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        chunk = functools.partial(writer.chunk, include_usage=usage)
        return event_stream(first, increments, chunk, writer.usage_chunk if usage else None)

    def include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @router.post("/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        """Complete a prompt (text or token ids) with the base model, an adapter or a mixture."""

        def build(caller: Caller) -> tuple[GenerationRequest, translate.Target]:
            return translate.completion_request(body, caller, front.engine.model_info)

        return await generate(request, build, translate.CompletionWriter, body.stream, include_usage(body))

    @router.post("/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        """Answer a conversation rendered with the model's chat template."""

        def build(caller: Caller) -> tuple[GenerationRequest, translate.Target]:
            return translate.chat_request(body, caller, front.engine.model_info, front.engine.chat_prompt)

        return await generate(request, build, translate.ChatWriter, body.stream, include_usage(body))

    @router.get("/models")
    async def list_models(request: Request) -> dict[str, Any]:
        """The base model, then every adapter the caller may use: its tenant's, or all without keys."""
        caller = front.caller(request.headers, Scope.INFER)
        info = front.engine.model_info
        data = [_base_model(info, front.started_at)]
        if front.admin is not None:
            tenant = None if caller.local_mode else caller.tenant  # a local caller may use every tenant's
            data += [_adapter_model(s, info) for s in await _all_adapters(front.admin, tenant)]
        return {"object": "list", "data": data}

    @router.get("/models/{model:path}")
    async def get_model(model: str, request: Request) -> dict[str, Any]:
        """One entry of /v1/models: the base model, or an adapter the caller may use."""
        caller = front.caller(request.headers, Scope.INFER)
        info = front.engine.model_info
        if model == info.model_id:
            return _base_model(info, front.started_at)
        tenant, name = adapter_ids.admin_target(model, caller)
        if front.admin is None:
            raise AdapterNotFound(f"adapter {quote(model)} not found")
        return _adapter_model(await front.admin.get(tenant, name), info)

    return router
