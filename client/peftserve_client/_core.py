"""What the sync and async clients share: request building, result conversion, health codec."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TypedDict

import grpc
from google.protobuf import wrappers_pb2

from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client.types import (
    AdapterFile,
    AdapterManifest,
    AdapterPage,
    AdapterStatus,
    FinishReason,
    GenerateResult,
    ModelInfo,
    PrefixCacheStats,
    StreamChunk,
    Tier,
    TokenizeResult,
    Usage,
)

API_KEY_HEADER = "x-api-key"
HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
UPLOAD_CHUNK_BYTES = 1 << 20
"""Upload message size: well under gRPC's default 4 MiB message limit."""

AdapterMixture = Mapping[str, float] | Sequence[tuple[str, float]]


class GenerateOptions(TypedDict, total=False):
    """Keyword options of generate() and generate_stream(); unset ones take the server's defaults."""

    adapter_id: str | None
    adapters: AdapterMixture | None
    max_new_tokens: int | None
    temperature: float | None
    top_k: int | None
    top_p: float | None
    seed: int | None
    repetition_penalty: float | None
    stop: str | Iterable[str] | None
    stop_token_ids: Iterable[int] | None
    ignore_eos: bool
    logprobs: bool
    prompt_token_ids: Sequence[int] | None
    request_id: str | None


_OPTIONAL_SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty")

_FINISH_REASONS = {
    pb.FINISH_REASON_LENGTH: FinishReason.LENGTH,
    pb.FINISH_REASON_STOP: FinishReason.STOP,
    pb.FINISH_REASON_EOS: FinishReason.EOS,
    pb.FINISH_REASON_CANCELLED: FinishReason.CANCELLED,
}

_TIERS = {
    pb.RESIDENCY_TIER_DISK: Tier.DISK,
    pb.RESIDENCY_TIER_HOST: Tier.HOST,
    pb.RESIDENCY_TIER_DEVICE: Tier.DEVICE,
}


def channel_credentials(
    tls: bool = False,
    ca_file: str | os.PathLike[str] | None = None,
    cert_file: str | os.PathLike[str] | None = None,
    key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials | None:
    """TLS credentials of a channel, or None for plaintext.

    TLS is on when tls is set or any file is given. ca_file: the CA that signed the server's
    certificate (None: the system's trusted roots). cert_file and key_file, together: the client's
    certificate for a server that requires mutual TLS.
    """
    if (cert_file is None) != (key_file is None):
        raise ValueError("a client certificate needs its key: give both cert_file and key_file, or neither")
    if not (tls or ca_file or cert_file):
        return None

    def read(path: str | os.PathLike[str] | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(read(ca_file), read(key_file), read(cert_file))


def metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the api key, if any."""
    return ((API_KEY_HEADER, api_key),) if api_key else ()


def deadline(call_timeout: float | None, default_timeout: float | None) -> float | None:
    """The per-call timeout, falling back to the client's."""
    return call_timeout if call_timeout is not None else default_timeout


def build_generate_request(prompt: str | None, options: GenerateOptions) -> pb.GenerateRequest:
    """A GenerateRequest from Python arguments; the server validates values, this checks types only."""
    unknown = set(options) - set(GenerateOptions.__annotations__)
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    sampling = pb.SamplingParams(
        stop=[options["stop"]] if isinstance(options.get("stop"), str) else list(options.get("stop") or ()),
        stop_token_ids=list(options.get("stop_token_ids") or ()),
        ignore_eos=bool(options.get("ignore_eos", False)),
        logprobs=bool(options.get("logprobs", False)),
    )
    for name in _OPTIONAL_SAMPLING:
        value = options.get(name)
        if value is not None:
            setattr(sampling, name, value)
    return pb.GenerateRequest(
        prompt=prompt or "",
        prompt_token_ids=list(options.get("prompt_token_ids") or ()),
        adapter_id=options.get("adapter_id") or "",
        adapters=[pb.AdapterWeight(adapter_id=a, weight=w) for a, w in _mixture(options.get("adapters"))],
        sampling=sampling,
        request_id=options.get("request_id") or "",
    )


def _mixture(adapters: AdapterMixture | None) -> list[tuple[str, float]]:
    if adapters is None:
        return []
    pairs = list(adapters.items()) if isinstance(adapters, Mapping) else [tuple(p) for p in adapters]
    for adapter_id, weight in pairs:
        if not math.isfinite(weight):
            raise ValueError(f"adapter weight of {adapter_id!r} must be finite, got {weight}")
    return pairs


def _finish_reason(value: int) -> FinishReason | None:
    return _FINISH_REASONS.get(value)


def to_generate_result(msg: pb.GenerateResponse) -> GenerateResult:
    """The typed form of a GenerateResponse."""
    return GenerateResult(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        finish_reason=_finish_reason(msg.finish_reason),
        usage=_to_usage(msg.usage),
        logprobs=tuple(msg.logprobs) if msg.logprobs else None,
    )


def to_stream_chunk(msg: pb.GenerateStreamResponse) -> StreamChunk:
    """The typed form of one GenerateStreamResponse."""
    return StreamChunk(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=tuple(msg.token_ids),
        logprobs=tuple(msg.logprobs) if msg.logprobs else None,
        finish_reason=_finish_reason(msg.finish_reason),
        usage=_to_usage(msg.usage) if msg.HasField("usage") else None,
    )


def to_tokenize_result(msg: pb.TokenizeResponse) -> TokenizeResult:
    """The typed form of a TokenizeResponse."""
    return TokenizeResult(token_ids=tuple(msg.token_ids), tokens=tuple(msg.tokens))


def _to_usage(msg: pb.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens, msg.cached_tokens)


def to_model_info(msg: pb.ModelInfoResponse) -> ModelInfo:
    """The typed form of a ModelInfoResponse."""
    return ModelInfo(
        model_id=msg.model_id,
        family=msg.family,
        vocab_size=msg.vocab_size,
        max_context=msg.max_context,
        max_new_tokens_limit=msg.max_new_tokens_limit,
        dtype=msg.dtype,
        device=msg.device,
        num_layers=msg.num_layers,
        hidden_size=msg.hidden_size,
        kv_blocks_total=msg.kv_blocks_total,
        kv_block_size=msg.kv_block_size,
        server_version=msg.server_version,
        eos_token_ids=tuple(msg.eos_token_ids),
        prefix_cache=_prefix_cache(msg.prefix_cache) if msg.HasField("prefix_cache") else None,
    )


def _prefix_cache(msg: pb.PrefixCacheStats) -> PrefixCacheStats:
    return PrefixCacheStats(
        enabled=msg.enabled,
        query_tokens=msg.query_tokens,
        hit_tokens=msg.hit_tokens,
        hit_rate=msg.hit_rate,
        cached_blocks=msg.cached_blocks,
        evictions=msg.evictions,
    )


def adapter_files(directory: str | os.PathLike[str]) -> list[Path]:
    """The regular files at the top of a PEFT adapter directory, by name; folders are skipped.

    Raises ValueError for a symbolic link (never followed) or another non-regular entry, and when
    there is no file at all.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"{root} is not a directory")
    files = []
    with os.scandir(root) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_symlink():
                raise ValueError(f"{entry.path} is a symbolic link: upload regular files only")
            if entry.is_dir(follow_symlinks=False):
                continue
            if not entry.is_file(follow_symlinks=False):
                raise ValueError(f"{entry.path} is not a regular file")
            files.append(Path(entry.path))
    if not files:
        raise ValueError(f"{root} holds no files to upload")
    return files


def upload_requests(
    adapter_id: str, files: Iterable[Path], chunk_size: int = UPLOAD_CHUNK_BYTES
) -> Iterator[pb.UploadAdapterRequest]:
    """The UploadAdapter stream: the id, then each file in chunks, read as the stream is sent."""
    yield pb.UploadAdapterRequest(adapter_id=adapter_id)
    for path in files:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))  # a file swapped for a link fails
        with open(fd, "rb") as f:
            data = f.read(chunk_size)
            while True:  # an empty file still sends one (empty) chunk
                yield pb.UploadAdapterRequest(file_name=path.name, data=data)
                data = f.read(chunk_size)
                if not data:
                    break


def to_adapter_manifest(msg: pb.AdapterManifest) -> AdapterManifest:
    """The typed form of an AdapterManifest."""
    return AdapterManifest(
        adapter_id=msg.adapter_id,
        version=msg.version,
        kind=msg.kind,
        peft_type=msg.peft_type,
        base_fingerprint=msg.base_fingerprint,
        ranks=tuple(msg.ranks),
        target_modules=tuple(msg.target_modules),
        num_virtual_tokens=msg.num_virtual_tokens,
        nbytes=msg.nbytes,
        files=tuple(AdapterFile(f.name, f.size, f.sha256) for f in msg.files),
        created_at=msg.created_at,
        device_bytes=msg.device_bytes,
        shared_bytes=msg.shared_bytes,
        forms=tuple(sorted(msg.forms.items())),
        needs_max_rank=msg.needs_max_rank,
    )


def to_adapter_status(msg: pb.AdapterStatus) -> AdapterStatus:
    """The typed form of an AdapterStatus."""
    return AdapterStatus(
        manifest=to_adapter_manifest(msg.manifest),
        tier=_TIERS.get(msg.tier),
        pinned=msg.pinned,
        active_requests=msg.active_requests,
    )


def to_adapter_page(msg: pb.ListAdaptersResponse) -> AdapterPage:
    """The typed form of a ListAdaptersResponse."""
    return AdapterPage(tuple(to_adapter_status(s) for s in msg.adapters), msg.next_page_token)


# grpc.health.v1 without grpcio-health-checking: HealthCheckRequest is {string service = 1} and
# HealthCheckResponse is {ServingStatus status = 1}, wire-compatible with StringValue / Int32Value.
HEALTH_REQUEST = wrappers_pb2.StringValue
HEALTH_RESPONSE = wrappers_pb2.Int32Value
_SERVING_STATUS = ("UNKNOWN", "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN")


def serving_status_name(msg: wrappers_pb2.Int32Value) -> str:
    """The ServingStatus name of a health check response, e.g. 'SERVING'."""
    return _SERVING_STATUS[msg.value] if 0 <= msg.value < len(_SERVING_STATUS) else "UNKNOWN"
