"""Ties sequences to adapter versions: bound at submission, slots held while running, routed per step.

Plain Python over the AdapterManager (which owns the tensors). The engine calls ``bind`` when a request
arrives (the request then holds the versions it resolved to, whatever is uploaded or deleted later),
``on_plan`` after each schedule (slots for admitted sequences, released for preempted ones) and
``unbind`` when a sequence ends or is dropped before it ran; it packs each step with ``slot_weights``
and hands the runner the K/V of ``prefix_kv``.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

from peftserve.engine.request import AdapterRef
from peftserve.engine.scheduler import StepPlan
from peftserve.engine.sequence import Sequence
from peftserve.engine.step import SlotWeights
from peftserve.errors import CapacityExceeded

log = logging.getLogger(__name__)


class AdapterBinding:
    """The engine's view of the AdapterManager."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self.slot_weights: dict[Sequence, SlotWeights] = {}
        """Running sequences' held (slot, weight) pairs (engine thread), read by pack()."""
        self._bound: set[Sequence] = set()  # sequences holding versions (bound on any thread)
        self._lock = threading.Lock()

    @property
    def num_slots(self) -> int:
        return self.manager.num_slots

    def pinned_keys(self) -> frozenset[str]:
        """Versions pinned in slots (the scheduler reserves their slots)."""
        return self.manager.slots.pinned_slot_keys

    # -- submission (any thread) ----------------------------------------------------------------

    def bind(self, seq: Sequence, refs: tuple[AdapterRef, ...]) -> None:
        """Resolve a request's adapters to versions and hold them (AdapterNotFound / InvalidRequest)."""
        resolved = self.manager.resolve(refs)
        seq.deltas = resolved.deltas
        seq.prefix_adapter = resolved.prefix
        seq.num_virtual = resolved.num_virtual_tokens
        with self._lock:
            self._bound.add(seq)
        seq.adapter_contents = tuple(self._content(key) for key in seq.adapter_keys)

    def _content(self, key: str) -> str:
        """A version's files by name and sha256: its weights, should a version key ever come back."""
        return ",".join(f"{f.name}:{f.sha256}" for f in self.manager.info(key).files)

    def host_loads(self, seq: Sequence) -> list[Future]:
        """Futures of the sequence's versions in host memory (the async front awaits them off-thread)."""
        return self.manager.ensure_host(seq.adapter_keys)

    def wait_host(self, seq: Sequence) -> None:
        """Block until the sequence's versions are in host memory (at once when the front awaited them)."""
        missing = self.manager.missing_from_host(seq.adapter_keys)
        for future in self.manager.ensure_host(missing) if missing else ():
            future.result()

    def unbind(self, seq: Sequence, finished: bool = True) -> None:
        """Release the sequence's slots (engine thread) and version holds; count its traffic if it ran."""
        self._release_slots(seq)
        with self._lock:
            if seq not in self._bound:
                return
            self._bound.discard(seq)
        self.manager.release_holds(seq.adapter_keys)
        if finished:
            self.manager.record_traffic(seq.adapter_keys, len(seq.output_ids))

    # -- steps (engine thread) ------------------------------------------------------------------

    def removed_versions(self) -> list[str]:
        """Version keys deleted or pruned since the last call."""
        return self.manager.take_removed()

    def on_plan(self, plan: StepPlan) -> list[Sequence]:
        """Apply pending device drops, release preempted sequences' slots, acquire admitted ones'.

        Returns the admitted sequences whose adapters could not be placed (none while the scheduler's
        slot budget and the slots agree): they hold nothing, and the engine puts them back in the queue.
        """
        self.manager.apply_drops()
        for seq in plan.preempted:
            self._release_slots(seq)
        unplaced = []
        for seq in plan.admitted:
            if not seq.deltas:
                continue
            pairs: list[tuple[int, float]] = []
            try:
                for held in seq.deltas:
                    pairs.append((self.manager.acquire(held.key), held.weight))
            except CapacityExceeded:
                for held in seq.deltas[: len(pairs)]:
                    self.manager.release(held.key)
                log.error("request %s: no device slot for %s; it goes back to the queue", seq.request_id,
                          ", ".join(seq.slot_adapters))  # fmt: skip
                unplaced.append(seq)
                continue
            self.slot_weights[seq] = tuple(pairs)
        return unplaced

    def _release_slots(self, seq: Sequence) -> None:
        if self.slot_weights.pop(seq, None) is not None:
            for held in seq.deltas:
                self.manager.release(held.key)

    def prefix_kv(self, key: str):
        """A prefix adapter version's [L, 2, kv_heads, nvt, head_dim] K/V on the model's device."""
        return self.manager.prefix_kv(key)
