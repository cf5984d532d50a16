"""Ties sequences to adapters: resolved at submission, slots held while running, routed per step.

Plain Python over the AdapterManager (which owns the tensors): the engine calls ``bind`` when a
request arrives, ``on_plan`` after each schedule (slots for admitted sequences, released for
preempted ones) and ``unbind`` when a sequence ends; the runner calls ``build_batch``.
"""

from __future__ import annotations

from peftserve.engine.request import AdapterRef
from peftserve.engine.scheduler import StepPlan
from peftserve.engine.sequence import Sequence


class AdapterBinding:
    """The engine's view of the AdapterManager."""

    def __init__(self, manager) -> None:
        self.manager = manager
        self._slots: dict[str, tuple[tuple[int, float], ...]] = {}  # request id -> held (slot, weight)

    @property
    def num_slots(self) -> int:
        return self.manager.num_slots

    def bind(self, seq: Sequence, refs: tuple[AdapterRef, ...]) -> None:
        """Validate a request's adapters (AdapterNotFound / InvalidRequest) and record them on seq."""
        resolved = self.manager.resolve(refs)
        seq.deltas = resolved.deltas
        seq.prefix_adapter = resolved.prefix
        seq.num_virtual = resolved.num_virtual_tokens

    def on_plan(self, plan: StepPlan) -> None:
        for seq in plan.preempted:
            self._release(seq)
        for seq in plan.admitted:
            if seq.deltas:
                self._slots[seq.request_id] = tuple(
                    (self.manager.acquire(ref.adapter_id), ref.weight) for ref in seq.deltas
                )

    def unbind(self, seq: Sequence) -> None:
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if self._slots.pop(seq.request_id, None) is not None:
            for ref in seq.deltas:
                self.manager.release(ref.adapter_id)

    # -- runner side ----------------------------------------------------------------------------

    def build_batch(self, plan: StepPlan, num_tokens: int):
        """The step's AdapterBatch: each chunk's packed token span and its (slot, weight) pairs."""
        spans = []
        start = 0
        for chunk in plan.chunks:
            pairs = self._slots.get(chunk.seq.request_id)
            if pairs:
                spans.append((start, chunk.num_tokens, pairs))
            start += chunk.num_tokens
        return self.manager.build_batch(spans, num_tokens) if spans else None

    def set_batch(self, batch) -> None:
        self.manager.set_batch(batch)

    def prefix_kv(self, adapter_id: str):
        return self.manager.prefix_kv(adapter_id)
