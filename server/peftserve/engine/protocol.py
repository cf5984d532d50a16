"""What the API layer needs from an engine, as plain data and one Protocol (no torch)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from peftserve.engine.request import GenerationRequest, RequestOutput


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


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics and health."""

    waiting: int
    running: int
    kv_blocks_used: int
    kv_blocks_free: int


class EngineClient(Protocol):
    """The engine as the servicer sees it."""

    @property
    def model_info(self) -> ModelInfo: ...

    def tokenize(self, text: str) -> list[int]: ...

    def token_strings(self, token_ids: list[int]) -> list[str]:
        """The text of each token on its own."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Stream a request's increments; the last has finish_reason set.

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
