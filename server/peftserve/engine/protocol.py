"""What the API layer needs from an engine, as plain data and one Protocol (no torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from peftserve.engine.request import GenerationRequest, RequestOutput
from peftserve.store.manifest import AdapterManifest


@dataclass(frozen=True)
class PrefixCacheStats:
    """The prefix cache since start (mirrors the PrefixCacheStats message)."""

    enabled: bool
    query_tokens: int
    """Prompt tokens looked up in the cache when requests were admitted (again after a preemption)."""
    hit_tokens: int
    """Of those, tokens found: their KV was reused, not computed."""
    cached_blocks: int
    """KV blocks in the cache now, in use or not."""
    evictions: int
    """Cached blocks dropped to make room."""

    @property
    def hit_rate(self) -> float:
        """hit_tokens / query_tokens; 0 before any lookup."""
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass(frozen=True)
class ModelInfo:
    """The served base model and the engine's limits (mirrors ModelInfoResponse)."""

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
    eos_token_ids: tuple[int, ...]
    prefix_cache: PrefixCacheStats | None = None
    """The prefix cache's counters when the info was asked for; None where not known (a cluster)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health."""

    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache: PrefixCacheStats | None = None
    warming: int = 0
    """Warm-up work still running (attention, adapter kernels, packing: ModelRunner); 0: full speed."""


class EngineClient(Protocol):
    """The engine as the servicer sees it."""

    admin: AdapterAdmin | None
    """Adapter lifecycle (the Adapters service), or None when the engine serves no adapters."""

    @property
    def model_info(self) -> ModelInfo: ...

    def tokenize(self, text: str) -> list[int]: ...

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The text of each token on its own."""
        ...

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt token ids of a conversation ({role, content} dicts) in the model's chat template,
        the assistant's turn opened; InvalidRequest when the model has none or it refuses them."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's increments; the last has finish_reason set. A stream that lags behind
        the engine gets the increments waiting for it merged into one.

        Raises InvalidRequest / AdapterNotFound / CapacityExceeded / Unavailable at the first
        iteration, before any output. Closing or cancelling the iterator aborts the request
        and frees its KV blocks within one engine step.
        """
        ...

    def stats(self) -> EngineStats: ...

    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let in-flight requests finish for up to grace_s, then cancel the rest."""
        ...

    def shutdown(self) -> None:
        """Release the engine's resources (its thread) after drain."""
        ...


# -- adapter administration: what the admin API needs from the adapter registry ----------------

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""Adapters in one ListAdapters page: when none is asked for, and at most."""

FileChunks = AsyncIterator[tuple[str, bytes]]
"""An upload's files as (file name, bytes) chunks, each file's chunks in a row."""

Tier = str
"""Where an adapter version lives now: "disk", "host" (CPU memory cache) or "device" (a slot)."""


@dataclass(frozen=True)
class AdapterStatus:
    """A registered adapter's current version and where it is."""

    manifest: AdapterManifest
    tier: Tier
    pinned: bool
    active_requests: int


class AdapterAdmin(Protocol):
    """Adapter lifecycle, always scoped to one tenant. Ids here are names inside that tenant.

    Errors: InvalidRequest (bad id, bad files), AdapterNotFound (missing, or another tenant's: the
    same message), FailedPrecondition (trained for another base model), CapacityExceeded (quota).
    """

    async def upload(self, tenant: str, name: str, files: FileChunks) -> AdapterManifest:
        """Write the files to disk as they arrive, validate them completely, then commit a new version
        atomically; it serves new requests at once. CapacityExceeded as soon as the size cap is passed."""
        ...

    async def load(self, tenant: str, name: str, pin: bool = False) -> AdapterStatus:
        """Bring the current version to a device slot (pinned: never evicted until unloaded)."""
        ...

    async def unload(self, tenant: str, name: str) -> AdapterStatus:
        """Drop it from device and host memory (in-flight requests finish first); the store keeps it."""
        ...

    async def delete(self, tenant: str, name: str) -> None:
        """Remove every version from the store; in-flight requests finish on what they started with."""
        ...

    async def list(
        self, tenant: str | None, page_size: int, page_token: str
    ) -> tuple[list[AdapterStatus], str]:
        """The tenant's adapters (every tenant's when None: local mode) sorted by full id; returns the
        page and the next page token ('' at the end). page_size 0 takes DEFAULT_PAGE_SIZE."""
        ...

    async def get(self, tenant: str, name: str) -> AdapterStatus: ...
