"""Scheduling policy: which sequences run in the next step, under token, KV-block and slot budgets.

Plain Python, no torch. The policy, per step:

1. **Decode first.** Every running sequence whose prompt is computed feeds its one new token,
   oldest first. A sequence that crosses a block boundary takes a new block; when none is free,
   the youngest running sequence is preempted (its blocks freed, it goes back to the head of the
   queue and later recomputes its prompt and output), so the oldest always progress.
2. **Prefill work shares the rest of the budget,** in fair order: the next chunk of a prompt under
   way (chunked prefill), or the admission of a waiting sequence from the queues, one per tenant
   (engine/fairness.py), whichever belongs to the tenant that has received the least service
   (``fair``, the default: its virtual token counter; on a tie, the admission). Under
   ``fcfs``, prompts under way first, then admissions in arrival order. A tenant at its running limit
   waits. Admission goes on while the running limit, the free blocks (enough for the whole prompt,
   prefix-tuning virtual tokens included) and the adapter slots (distinct adapters among running
   sequences, plus the pinned ones the engine reserves) allow. When the next sequence lacks blocks,
   admission stops for this step (smaller requests behind it would starve it). A sequence lacking only
   adapter slots is passed over, up to MAX_SLOT_WAITS steps; then it holds admission until it fits.
   An admitted sequence starts with the longest prefix of its own identity found in the prefix cache
   (engine/prefix_cache.py): those blocks join its table and their tokens are neither computed nor
   charged to its tenant (only computed tokens are), and it needs free blocks for the rest only. A
   sequence that would fit but whose next block a running sequence is computing right now (the same
   system prompt sent twice at once) is passed over until that block is cached, rather than compute it
   a second time; the running sequence's prefill keeps going, so the wait ends within its prompt.
3. **Pack by adapter.** The step's chunks are ordered by adapter, so each adapter's tokens are
   contiguous in the packed batch.

Prefill chunks and decode tokens share one step of at most ``max_batched_tokens`` tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from peftserve.engine.fairness import TenantQueues
from peftserve.engine.prefix_cache import BlockPool, blocks_needed
from peftserve.engine.request import FinishReason
from peftserve.engine.sequence import SeqStatus, Sequence


class StepOutcome(Protocol):
    """What the scheduler reads of a step's output (engine.step.StepOutput)."""

    @property
    def computed(self) -> Iterable[tuple[Sequence, int]]: ...

    @property
    def non_finite(self) -> Iterable[Sequence]: ...


MAX_SLOT_WAITS = 16
"""Steps a request waiting for adapter slots may be passed over before it holds the queue."""


@dataclass(frozen=True)
class ScheduledChunk:
    """Feed the sequence's next ``num_tokens`` pending tokens; sample after the last if ``sample``."""

    seq: Sequence
    num_tokens: int
    sample: bool


@dataclass
class StepPlan:
    """What the runner executes in one step, in packing order (decodes, then prefill chunks)."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)
    """Sequences (re)admitted this step: the runner writes their prefix KV before the forward."""
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    """Owns the waiting queue, the running set and the KV blocks (with the prefix cache over them)."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_batched_tokens: int,
        max_running: int,
        max_slot_adapters: int,
        policy: str = "fair",
        prefix_cache: bool = True,
        prefix_cache_tenant_share: float | None = None,
    ) -> None:
        self.block_size = block_size
        self.max_batched_tokens = max_batched_tokens
        self.max_running = max_running
        self.max_slot_adapters = max_slot_adapters
        self.allocator = BlockPool(num_blocks, block_size, prefix_cache, prefix_cache_tenant_share)
        self.waiting = TenantQueues(policy)
        self.running: list[Sequence] = []  # oldest first
        self._by_id: dict[str, Sequence] = {}
        self.num_preemptions = 0
        """Preemptions since start (for metrics and tests)."""
        self.reserved_slot_adapters: frozenset[str] = frozenset()
        """Adapters pinned in slots, set by the engine before each schedule: their slots are taken."""

    # -- bookkeeping ------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self._by_id[seq.request_id] = seq
        self.waiting.push(seq)

    def get(self, request_id: str) -> Sequence | None:
        return self._by_id.get(request_id)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Remove a sequence for good and free its blocks."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
            self.waiting.stopped(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        self._by_id.pop(seq.request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- policy -----------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_batched_tokens

        for seq in list(self.running):  # decodes, oldest first
            if seq.status is not SeqStatus.RUNNING or seq.is_prefilling or budget == 0:
                continue
            if not self._grow(seq, plan):
                continue  # seq itself was preempted
            self._add_chunk(plan, seq, 1, decode=True)
            budget -= 1

        # Prefill work: chunks of prompts under way and admissions share what is left of the budget,
        # the least served tenant first (fcfs: prompts under way first, then arrival order).
        under_way = [seq for seq in self.running if seq.is_prefilling]  # oldest first
        passed_over: set[Sequence] = set()
        admitting = True
        while budget > 0:
            candidate = None
            if admitting and len(self.running) < self.max_running:
                candidate = self.waiting.next_candidate(passed_over, self._under_running_limit)
            going = min(under_way, key=self.waiting.priority) if under_way else None
            if going is not None and (candidate is None or self.waiting.goes_first(going, candidate)):
                under_way.remove(going)
                budget -= self._add_chunk(plan, going, min(going.num_pending, budget))
                continue
            if candidate is None:
                break
            if not self._admit(candidate, plan, passed_over):
                admitting = candidate in passed_over  # lacking blocks, or holding the line: stop
                continue
            budget -= self._add_chunk(plan, candidate, min(candidate.num_pending, budget))
        # Sequences sharing adapters sit side by side, so each adapter's tokens form one contiguous
        # run in the packed batch (sliced, not gathered, by the adapter kernels). Stable: FCFS within.
        plan.chunks.sort(key=lambda c: c.seq.slot_adapters)
        return plan

    def update(self, output: StepOutcome) -> None:
        """Take in what a step computed: each scheduled sequence's KV grew by its chunk, and the blocks
        it filled join the prefix cache (not those of a sequence whose logits were not finite)."""
        failed = set(output.non_finite)
        for seq, num_tokens in output.computed:
            seq.num_computed += num_tokens
            if seq not in failed:
                self.allocator.cache_computed(seq)

    def _admit(self, seq: Sequence, plan: StepPlan, passed_over: set[Sequence]) -> bool:
        """Admit seq if its blocks and adapter slots allow; a sequence lacking only slots is passed over.

        It starts with its longest prefix in the prefix cache and needs free blocks for the rest only
        (and for the cached blocks no sequence holds, which leave the free queue). One that would fit
        but whose next block a running sequence is computing is passed over until that block is cached."""
        hits = self.allocator.lookup(seq)
        need = blocks_needed(seq.kv_len, self.block_size) - len(hits)
        if need + self.allocator.num_idle(hits) > self.allocator.num_free:
            return False
        if not self._slots_allow(seq):
            seq.slot_waits += 1
            if seq.slot_waits <= MAX_SLOT_WAITS:
                passed_over.add(seq)  # others may go ahead of it this step
            return False  # else it has been passed over long enough: admit nobody else until it fits
        # Checked last, so a sequence lacking blocks or slots keeps its place in the line as above.
        if self._prefix_under_way(seq, len(hits)):
            passed_over.add(seq)  # admitted once that prefix is computed, it finds it in the cache
            return False
        self.waiting.remove(seq)
        self.allocator.admit(seq, hits, need)
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)
        self.waiting.started(seq)
        plan.admitted.append(seq)
        return True

    def _prefix_under_way(self, seq: Sequence, block: int) -> bool:
        """Whether a running sequence is prefilling seq's block `block` (its first one not cached).

        The wait ends: that sequence computes the block (cached then, or, over its tenant's share, not:
        seq no longer waits for it either way), or it is preempted or finished and leaves the running set.
        Only a sequence of seq's own identity can be computing a block with seq's digest."""
        if block >= min(len(seq.block_digests), (seq.kv_len - 1) // self.block_size):
            return False  # nothing more it could find cached (or no cache: lookup left no digests)
        digest = seq.block_digests[block]
        end = (block + 1) * self.block_size
        return any(
            other.num_computed < end
            and block < len(other.block_digests)
            and other.block_digests[block] == digest
            for other in self.running
            if other.is_prefilling
        )

    def _add_chunk(self, plan: StepPlan, seq: Sequence, n: int, decode: bool = False) -> int:
        """Schedule seq's next n tokens (sampling after the last pending one) and charge its tenant."""
        plan.chunks.append(ScheduledChunk(seq, n, sample=n == seq.num_pending))
        self.waiting.charge(seq.tenant, n, decode)
        return n

    def _under_running_limit(self, seq: Sequence) -> bool:
        limit = seq.limits.max_running
        return limit is None or self.waiting.running[seq.tenant] < limit

    def requeue(self, seq: Sequence, plan: StepPlan) -> None:
        """Undo seq's admission in this plan (its adapters found no device slot): back to its queue's head."""
        plan.admitted.remove(seq)
        for chunk in plan.chunks:
            if chunk.seq is seq:
                self.waiting.charge(seq.tenant, -chunk.num_tokens, decode=False)  # not computed after all
        self._back_to_queue(seq, plan)

    def _grow(self, seq: Sequence, plan: StepPlan) -> bool:
        """Give seq the blocks its next token needs, preempting the youngest; False if seq was."""
        need = blocks_needed(seq.kv_len, self.block_size) - len(seq.blocks)
        while need > self.allocator.num_free:
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        if need > 0:
            seq.blocks.extend(self.allocator.allocate(need))
        return True

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        self._back_to_queue(seq, plan)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted.append(seq)

    def _back_to_queue(self, seq: Sequence, plan: StepPlan) -> None:
        """A running sequence waits again at the head of its tenant's queue, its blocks freed."""
        self.running.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        self.waiting.push(seq, front=True)  # queued before it stops running: its tenant stays active
        self.waiting.stopped(seq)
        plan.chunks[:] = [c for c in plan.chunks if c.seq is not seq]

    def _slots_allow(self, seq: Sequence) -> bool:
        if not seq.slot_adapters:
            return True
        in_use = {a for s in self.running for a in s.slot_adapters} | self.reserved_slot_adapters
        return len(in_use | set(seq.slot_adapters)) <= self.max_slot_adapters
