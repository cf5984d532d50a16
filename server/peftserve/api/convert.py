"""Protobuf ⇄ domain objects of the engine, and the checks only the wire format needs."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from peftserve import __version__
from peftserve.engine.protocol import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    AdapterStatus,
    ModelInfo,
    PrefixCacheStats,
)
from peftserve.engine.request import (
    MAX_MIXTURE_ADAPTERS,
    AdapterRef,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    TenantLimits,
)
from peftserve.errors import InvalidRequest
from peftserve.store.ids import DEFAULT_TENANT
from peftserve.store.manifest import AdapterManifest
from peftserve_client._proto import peftserve_pb2 as pb

MAX_REQUEST_ID_CHARS = 128

_OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty")
_FLOAT_SAMPLING = frozenset({"temperature", "top_p", "repetition_penalty"})

_FINISH_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}

_TIERS = {
    "disk": pb.RESIDENCY_TIER_DISK,
    "host": pb.RESIDENCY_TIER_HOST,
    "device": pb.RESIDENCY_TIER_DEVICE,
}

IdResolver = Callable[[str], str]
"""The full id of an adapter id as the caller wrote it (api/adapter_ids.resolve for one caller)."""


def _from_float32(value: float) -> float:
    """The shortest decimal a proto float stands for: 0.7 arrives as 0.699999988 otherwise."""
    return float(f"{value:.7g}")


def to_sampling_params(msg: pb.SamplingParams) -> SamplingParams:
    """SamplingParams with its own defaults wherever the optional proto field is unset."""
    given = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING if msg.HasField(name)}
    for name in _FLOAT_SAMPLING & given.keys():
        given[name] = _from_float32(given[name])
    return SamplingParams(
        **given,
        stop=tuple(msg.stop),
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
    )


def to_adapters(msg: pb.GenerateRequest, resolve: IdResolver) -> tuple[AdapterRef, ...]:
    """The adapters a request names, by full id: none, adapter_id, or a weighted mixture.

    Only the wire shape is checked here; the engine checks the list itself (check_adapter_refs).
    """
    if msg.adapter_id and msg.adapters:
        raise InvalidRequest("give either adapter_id or adapters, not both")
    if msg.adapter_id:
        return (AdapterRef(resolve(msg.adapter_id)),)
    if len(msg.adapters) > MAX_MIXTURE_ADAPTERS:  # before resolving each of an arbitrary number of ids
        raise InvalidRequest(f"at most {MAX_MIXTURE_ADAPTERS} adapters in a mixture, got {len(msg.adapters)}")
    refs = []
    for a in msg.adapters:
        if not a.adapter_id:
            raise InvalidRequest("adapters: every entry needs an adapter_id")
        refs.append(AdapterRef(resolve(a.adapter_id), _from_float32(a.weight)))
    return tuple(refs)


def to_generation_request(
    msg: pb.GenerateRequest,
    resolve: IdResolver,
    tenant: str = DEFAULT_TENANT,
    limits: TenantLimits | None = None,
) -> GenerationRequest:
    """The engine's request for a GenerateRequest; sampling values are validated by the engine."""
    if msg.prompt and msg.prompt_token_ids:
        raise InvalidRequest("give either prompt or prompt_token_ids, not both")
    if not msg.prompt and not msg.prompt_token_ids:
        raise InvalidRequest("prompt must not be empty (or give prompt_token_ids)")
    if len(msg.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest(f"request_id must be at most {MAX_REQUEST_ID_CHARS} characters")
    return GenerationRequest(
        request_id=msg.request_id or uuid.uuid4().hex,
        prompt=msg.prompt,
        prompt_token_ids=list(msg.prompt_token_ids) if msg.prompt_token_ids else None,
        sampling=to_sampling_params(msg.sampling),
        adapters=to_adapters(msg, resolve),
        tenant=tenant,
        limits=limits,
    )


def _finish_reason(output: RequestOutput) -> int:
    return _FINISH_REASONS[output.finish_reason] if output.finish_reason else pb.FINISH_REASON_UNSPECIFIED


def to_stream_response(output: RequestOutput) -> pb.GenerateStreamResponse:
    """One stream message per engine increment; the last one carries finish_reason and usage."""
    msg = pb.GenerateStreamResponse(
        request_id=output.request_id,
        text=output.text,
        token_ids=output.token_ids,
        logprobs=output.logprobs or (),
        finish_reason=_finish_reason(output),
    )
    if output.finished:
        msg.usage.CopyFrom(_usage(output))
    return msg


def _usage(output: RequestOutput) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens,
        cached_tokens=output.cached_tokens,
    )


def to_generate_response(request_id: str, outputs: Sequence[RequestOutput]) -> pb.GenerateResponse:
    """All of a request's increments merged into one response."""
    last = outputs[-1] if outputs else None
    return pb.GenerateResponse(
        request_id=request_id,
        text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        finish_reason=_finish_reason(last) if last else pb.FINISH_REASON_UNSPECIFIED,
        usage=_usage(last) if last else pb.Usage(),
        logprobs=[lp for o in outputs for lp in (o.logprobs or ())],
    )


def to_tokenize_response(token_ids: list[int], tokens: list[str]) -> pb.TokenizeResponse:
    """A TokenizeResponse from ids and their texts."""
    return pb.TokenizeResponse(token_ids=token_ids, tokens=tokens)


def to_model_info_response(info: ModelInfo) -> pb.ModelInfoResponse:
    """The wire form of the engine's ModelInfo, with the server version added."""
    return pb.ModelInfoResponse(
        model_id=info.model_id,
        family=info.family,
        vocab_size=info.vocab_size,
        max_context=info.max_context,
        max_new_tokens_limit=info.max_new_tokens_limit,
        dtype=info.dtype,
        device=info.device,
        num_layers=info.num_layers,
        hidden_size=info.hidden_size,
        kv_blocks_total=info.kv_blocks_total,
        kv_block_size=info.kv_block_size,
        server_version=__version__,
        eos_token_ids=info.eos_token_ids,
        prefix_cache=_prefix_cache_message(info.prefix_cache) if info.prefix_cache is not None else None,
    )


def _prefix_cache_message(stats: PrefixCacheStats) -> pb.PrefixCacheStats:
    return pb.PrefixCacheStats(
        enabled=stats.enabled,
        query_tokens=stats.query_tokens,
        hit_tokens=stats.hit_tokens,
        hit_rate=stats.hit_rate,
        cached_blocks=stats.cached_blocks,
        evictions=stats.evictions,
    )


def to_manifest_message(manifest: AdapterManifest) -> pb.AdapterManifest:
    """The wire form of a stored adapter version."""
    return pb.AdapterManifest(
        adapter_id=manifest.adapter_id,
        version=manifest.version,
        kind=manifest.kind,
        peft_type=manifest.peft_type,
        base_fingerprint=manifest.base_fingerprint,
        ranks=manifest.ranks,
        target_modules=manifest.target_modules,
        num_virtual_tokens=manifest.num_virtual_tokens,
        nbytes=manifest.nbytes,
        files=[pb.AdapterFile(name=f.name, size=f.size, sha256=f.sha256) for f in manifest.files],
        created_at=manifest.created_at,
        device_bytes=manifest.device_bytes,
        shared_bytes=manifest.shared_bytes,
        forms=dict(manifest.forms),
        needs_max_rank=manifest.needs_max_rank,
    )


def to_status_message(status: AdapterStatus) -> pb.AdapterStatus:
    """The wire form of an adapter's status."""
    return pb.AdapterStatus(
        manifest=to_manifest_message(status.manifest),
        tier=_TIERS[status.tier],
        pinned=status.pinned,
        active_requests=status.active_requests,
    )


def to_list_response(statuses: Sequence[AdapterStatus], next_page_token: str) -> pb.ListAdaptersResponse:
    """One page of adapters."""
    return pb.ListAdaptersResponse(
        adapters=[to_status_message(s) for s in statuses], next_page_token=next_page_token
    )


def page_size(requested: int) -> int:
    """The page size to use: 0 takes the default, larger than the maximum takes the maximum."""
    return min(requested, MAX_PAGE_SIZE) if requested else DEFAULT_PAGE_SIZE
