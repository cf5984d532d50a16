"""A request's state inside the engine (plain Python; the scheduler and engine share it)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from peftserve.engine.request import FinishReason, SamplingParams, TenantLimits
from peftserve.store.ids import DEFAULT_TENANT


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class HeldVersion:
    """An adapter version a sequence holds, by its version key ('tenant/name@vN'), and its weight."""

    key: str
    weight: float = 1.0


@dataclass(eq=False)
class Sequence:
    """One request's tokens, KV blocks and progress.

    KV indices count the prefix-tuning virtual tokens first: a sequence with ``num_virtual``
    virtual tokens keeps token i of ``token_ids`` at KV index (and position id) num_virtual + i.
    """

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    tenant: str = DEFAULT_TENANT
    limits: TenantLimits = field(default_factory=TenantLimits)
    """The tenant's limits in force for this request (engine defaults under its key's)."""
    deltas: tuple[HeldVersion, ...] = ()
    """Delta adapter versions (every kind but prefix tuning) with mixture weights; one slot each."""
    prefix_adapter: str | None = None
    """The prefix-tuning adapter version whose virtual tokens lead the KV, if any."""
    num_virtual: int = 0
    """Prefix-tuning virtual tokens written into the first KV entries at admission."""
    adapter_contents: tuple[str, ...] = ()
    """Each adapter version's file names and sha256 (adapter_keys order): part of its prefix-cache key."""
    arrival: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0
    """KV entries already written (virtual tokens included)."""
    num_cached: int = 0
    """KV entries found in the prefix cache at its last admission (whole blocks; virtual tokens included)."""
    num_cached_prompt: int = 0
    """Prompt tokens found in the prefix cache at its first admission (what its usage reports)."""
    num_indexed_blocks: int = 0
    """Blocks at the head of ``blocks`` already offered to the prefix cache's index."""
    block_digests: list[bytes] = field(default_factory=list)
    """Prefix-cache digests of its first full KV blocks (engine/prefix_cache.py), computed once."""
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    slot_waits: int = 0
    """Steps the scheduler passed this sequence over because its adapters had no free slots."""

    @property
    def slot_adapters(self) -> tuple[str, ...]:
        """Version keys that must hold a device slot while the sequence runs."""
        return tuple(held.key for held in self.deltas)

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        """Every adapter version the sequence holds (deltas, then the prefix)."""
        prefix = (self.prefix_adapter,) if self.prefix_adapter is not None else ()
        return self.slot_adapters + prefix

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def kv_len(self) -> int:
        """KV entries the sequence has once every known token is computed."""
        return self.num_virtual + len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_pending(self) -> int:
        """Known tokens whose KV is not computed yet."""
        return self.kv_len - self.num_computed

    @property
    def is_prefilling(self) -> bool:
        return self.num_pending > 1

    def pending_token_ids(self, n: int) -> list[int]:
        """The next n tokens to feed."""
        start = self.num_computed - self.num_virtual
        return self.token_ids[start : start + n]
