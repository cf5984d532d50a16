"""Typed results of the client SDK: frozen dataclasses, no protobuf types."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass


class FinishReason(str, enum.Enum):
    """Why generation ended."""

    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class Usage:
    """Token counts of one request."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    """Prompt tokens whose KV the server reused from an earlier request (its prefix cache)."""


@dataclass(frozen=True)
class GenerateResult:
    """A whole completion."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    """Generated tokens only; the prompt is not repeated."""
    finish_reason: FinishReason | None
    usage: Usage
    logprobs: tuple[float, ...] | None = None
    """One per generated token when requested."""

    @classmethod
    def from_chunks(cls, chunks: Iterable[StreamChunk]) -> GenerateResult:
        """Merge a whole stream into the result generate() would have returned."""
        chunks = list(chunks)
        if not chunks or chunks[-1].usage is None:
            raise ValueError("the stream did not finish (no final chunk with usage)")
        last = chunks[-1]
        logprobs = [lp for c in chunks for lp in (c.logprobs or ())]
        return cls(
            request_id=last.request_id,
            text="".join(c.text for c in chunks),
            token_ids=tuple(t for c in chunks for t in c.token_ids),
            finish_reason=last.finish_reason,
            usage=last.usage,
            logprobs=tuple(logprobs) if logprobs else None,
        )

    @property
    def prompt_tokens(self) -> int:
        return self.usage.prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens


@dataclass(frozen=True)
class StreamChunk:
    """One streamed increment; the texts of all chunks concatenate to the completion."""

    request_id: str
    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None = None
    finish_reason: FinishReason | None = None
    """Set on the last chunk only."""
    usage: Usage | None = None
    """Set on the last chunk only."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class TokenizeResult:
    """Token ids of a text and the text each token stands for."""

    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]


@dataclass(frozen=True)
class PrefixCacheStats:
    """Reuse of computed prompt prefixes since the server started (within a tenant and adapter version)."""

    enabled: bool
    query_tokens: int
    """Prompt tokens looked up when requests were admitted."""
    hit_tokens: int
    """Of those, tokens found in the cache (not computed)."""
    hit_rate: float
    cached_blocks: int
    """KV blocks in the cache now."""
    evictions: int
    """Cached blocks dropped to make room."""


@dataclass(frozen=True)
class ModelInfo:
    """The served base model and the server's limits."""

    model_id: str
    family: str
    vocab_size: int
    max_context: int
    max_new_tokens_limit: int
    dtype: str
    device: str
    num_layers: int
    hidden_size: int
    kv_blocks_total: int
    kv_block_size: int
    server_version: str
    eos_token_ids: tuple[int, ...]
    prefix_cache: PrefixCacheStats | None = None
    """The prefix cache's counters; None when the server does not report them (a cluster)."""


class Tier(str, enum.Enum):
    """Where an adapter's current version is."""

    DISK = "disk"
    """Only in the server's store."""
    HOST = "host"
    """In the server's host memory cache."""
    DEVICE = "device"
    """In a device slot, ready for the next step."""


@dataclass(frozen=True)
class AdapterFile:
    """One stored file of an adapter version."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class AdapterManifest:
    """One stored version of an adapter."""

    adapter_id: str
    """Full id: 'tenant/name'."""
    version: str
    """'v1', 'v2', ... increasing per adapter id."""
    kind: str
    """How it is served: 'lora', 'adalora', 'dora', 'ia3', 'loha', 'lokr', 'vera', 'sparse' or 'prefix'."""
    peft_type: str
    base_fingerprint: str
    ranks: tuple[int, ...]
    target_modules: tuple[str, ...]
    num_virtual_tokens: int
    nbytes: int
    """Bytes of all stored files."""
    files: tuple[AdapterFile, ...]
    created_at: float
    """Unix time of the commit."""
    device_bytes: int = 0
    """Bytes one device slot holds for it (prefix tuning: its K/V) in the served dtype."""
    shared_bytes: int = 0
    """Bytes held once for every adapter sharing them (VeRA's frozen projections)."""
    forms: tuple[tuple[str, int], ...] = ()
    """(compute form, modules) it is served as, e.g. (('dense', 3), ('low_rank', 11)) for a LoHa."""
    needs_max_rank: int = 0
    """The smallest --adapter-max-rank that serves it."""


@dataclass(frozen=True)
class AdapterStatus:
    """An adapter's current version and where it is."""

    manifest: AdapterManifest
    tier: Tier | None
    """None when the server reports a tier this SDK does not know."""
    pinned: bool
    active_requests: int

    @property
    def adapter_id(self) -> str:
        return self.manifest.adapter_id


@dataclass(frozen=True)
class AdapterPage:
    """One page of list_adapters()."""

    adapters: tuple[AdapterStatus, ...]
    next_page_token: str
    """Pass it to the next call; empty on the last page."""
