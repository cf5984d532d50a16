"""The scheduling policy on its own (plain Python): budgets, FCFS admission, preemption."""

from __future__ import annotations

import itertools

from peftserve.engine.request import FinishReason, SamplingParams
from peftserve.engine.scheduler import MAX_SLOT_WAITS, Scheduler
from peftserve.engine.sequence import HeldVersion, SeqStatus, Sequence

_first_token = itertools.count(0, 1000)


def seq(rid: str, n: int, adapters: tuple[str, ...] = ()) -> Sequence:
    """n tokens no other request shares: the prefix cache (tests/engine/test_prefix_cache.py) stays out."""
    start = next(_first_token)
    tokens = list(range(start, start + n))
    return Sequence(rid, tokens, SamplingParams(), deltas=tuple(HeldVersion(a) for a in adapters))


def run(plan) -> None:
    """What the engine does after a step: count computed tokens, append one sampled token."""
    for chunk in plan.chunks:
        chunk.seq.num_computed += chunk.num_tokens
        if chunk.sample:
            chunk.seq.output_ids.append(0)


def test_prefill_is_chunked_under_the_token_budget_and_decodes_go_first():
    s = Scheduler(num_blocks=100, block_size=4, max_batched_tokens=8, max_running=4, max_slot_adapters=0)
    a, b = seq("a", 3), seq("b", 20)
    s.add(a)
    s.add(b)
    plan = s.schedule()
    assert [(c.seq.request_id, c.num_tokens, c.sample) for c in plan.chunks] == [
        ("a", 3, True),
        ("b", 5, False),
    ]
    run(plan)
    plan = s.schedule()
    assert [(c.seq.request_id, c.num_tokens, c.sample) for c in plan.chunks] == [
        ("a", 1, True),
        ("b", 7, False),
    ]
    assert plan.num_tokens == 8


def test_admission_is_fcfs_and_needs_blocks_for_the_whole_prompt():
    s = Scheduler(num_blocks=5, block_size=4, max_batched_tokens=64, max_running=8, max_slot_adapters=0)
    big, small = seq("big", 24), seq("small", 2)  # big needs 6 blocks: more than there are free
    s.add(seq("first", 8))
    s.add(big)
    s.add(small)
    plan = s.schedule()
    assert [c.seq.request_id for c in plan.chunks] == ["first"]  # small waits behind big
    assert s.allocator.num_free == 3


def test_the_youngest_is_preempted_and_resumes_first():
    s = Scheduler(num_blocks=4, block_size=4, max_batched_tokens=64, max_running=8, max_slot_adapters=0)
    old, young = seq("old", 8), seq("young", 7)
    s.add(old)
    s.add(young)
    run(s.schedule())  # old: 2 blocks, young: 2 blocks, all taken
    plan = s.schedule()  # old's 9th token needs a third block: young is preempted
    assert plan.preempted == [young] and young.status is SeqStatus.WAITING and young.num_computed == 0
    assert [c.seq.request_id for c in plan.chunks] == ["old"]
    assert list(s.waiting) == [young] and s.num_preemptions == 1
    run(plan)
    s.finish(old, FinishReason.LENGTH)
    plan = s.schedule()  # young recomputes its prompt and its sampled token
    assert plan.admitted == [young] and plan.chunks[0].num_tokens == 8


def test_distinct_adapters_among_running_sequences_never_exceed_the_slots():
    s = Scheduler(num_blocks=100, block_size=4, max_batched_tokens=64, max_running=8, max_slot_adapters=2)
    for rid, adapters in [("a", ("x",)), ("b", ("y",)), ("c", ("x", "y")), ("d", ("z",)), ("e", ())]:
        s.add(seq(rid, 3, adapters))
    plan = s.schedule()
    # d would need a third slot: it is passed over, and e behind it (no adapter) still runs.
    assert sorted(c.seq.request_id for c in plan.chunks) == ["a", "b", "c", "e"]
    assert [c.seq.request_id for c in plan.chunks] == ["e", "a", "c", "b"]  # packed by adapter
    assert [w.request_id for w in s.waiting] == ["d"]


def test_a_request_passed_over_for_slots_eventually_holds_the_queue():
    s = Scheduler(num_blocks=200, block_size=4, max_batched_tokens=64, max_running=64, max_slot_adapters=1)
    s.add(seq("a", 3, ("x",)))
    s.add(seq("b", 3, ("y",)))
    s.schedule()  # b's first wait: x holds the only slot
    for i in range(MAX_SLOT_WAITS - 1):
        s.add(seq(f"x{i}", 3, ("x",)))
        assert f"x{i}" in [c.seq.request_id for c in s.schedule().chunks]
    s.add(seq("late", 3, ("x",)))
    assert "late" not in [c.seq.request_id for c in s.schedule().chunks]  # b now holds the line
    assert [w.request_id for w in s.waiting] == ["b", "late"]
