"""The hand-off between engine and runner, as data: pack(plan) -> StepInput, execute -> StepOutput.

Plain Python (no torch import): tensors ride through as opaque values. `pack` is the one place that
places a step's tokens in the packed [1, T] batch, so token offsets, positions, sampling rows and the
adapter spans all come from the same computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from peftserve.engine.scheduler import StepPlan
from peftserve.engine.sequence import Sequence

SlotWeights = tuple[tuple[int, float], ...]
"""((slot, weight), ...) of one sequence's delta adapters."""


@dataclass(frozen=True)
class PackedChunk:
    """One scheduled chunk of a sequence, placed in the packed batch."""

    seq: Sequence
    start: int
    """Index of its first token in the packed batch."""
    num_tokens: int
    position: int
    """Position id (and KV index) of its first token: the sequence's num_computed at packing."""
    sample: bool
    """Whether a token is sampled after its last one."""

    @property
    def is_decode(self) -> bool:
        """A single token continuing a computed context (the runner's decode path)."""
        return self.num_tokens == 1 and self.position > 0


@dataclass(frozen=True)
class PrefixWrite:
    """A prefix-tuning adapter's K/V to write into a newly admitted sequence's first KV entries."""

    seq: Sequence
    kv: Any
    """[L, 2 (key, value), kv_heads, num_virtual_tokens, head_dim] on the model's device."""
    start: int = 0
    """The first virtual entry to write: those before it are in blocks found in the prefix cache."""


@dataclass(frozen=True)
class StepInput:
    """Everything the runner needs for one step, in packing order."""

    chunks: tuple[PackedChunk, ...]
    input_ids: tuple[int, ...]
    """[T] token ids, chunk after chunk."""
    positions: tuple[int, ...]
    """[T] position ids."""
    adapter_spans: tuple[tuple[int, int, SlotWeights], ...]
    """(start, num_tokens, slot weights) of every chunk whose sequence uses delta adapters."""
    prefixes: tuple[PrefixWrite, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def sampling(self) -> tuple[PackedChunk, ...]:
        """The chunks that sample, in packing order (the order of the logits rows)."""
        return tuple(c for c in self.chunks if c.sample)


def pack(plan: StepPlan, slot_weights: Mapping[Sequence, SlotWeights] | None = None) -> StepInput:
    """Place the plan's chunks one after another in a [1, T] batch.

    slot_weights: each running sequence's delta adapters as (slot, weight) pairs (sequences absent from
    it, or all of them when None, run on the base model).
    """
    chunks: list[PackedChunk] = []
    input_ids: list[int] = []
    positions: list[int] = []
    spans: list[tuple[int, int, SlotWeights]] = []
    for chunk in plan.chunks:
        seq, n = chunk.seq, chunk.num_tokens
        start, position = len(input_ids), seq.num_computed
        chunks.append(PackedChunk(seq, start, n, position, chunk.sample))
        input_ids += seq.pending_token_ids(n)
        positions += range(position, position + n)
        pairs = slot_weights.get(seq) if slot_weights is not None else None
        if pairs:
            spans.append((start, n, pairs))
    return StepInput(tuple(chunks), tuple(input_ids), tuple(positions), tuple(spans))


@dataclass(frozen=True)
class Sampled:
    """The token drawn for one sequence this step."""

    seq: Sequence
    token_id: int
    logprob: float


@dataclass(frozen=True)
class StepOutput:
    """What one step computed and produced."""

    computed: tuple[tuple[Sequence, int], ...]
    """(sequence, KV entries written this step) for every chunk the step ran."""
    sampled: list[Sampled] = field(default_factory=list)
    non_finite: list[Sequence] = field(default_factory=list)
    """Sequences whose logits held NaN or Inf this step: nothing was sampled for them."""
    logits: Any = None
    """[S, V] the logits of every sampling chunk, in StepInput.sampling order (None when none sampled)."""

    def logits_of(self, step: StepInput) -> dict[str, Any]:
        """request_id -> its [V] logits row this step."""
        if self.logits is None:
            return {}
        return {c.seq.request_id: row for c, row in zip(step.sampling, self.logits, strict=True)}
