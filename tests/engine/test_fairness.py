"""Fair share between tenants: admission by least service received, per-tenant limits, token budgets."""

from __future__ import annotations

import pytest

from peftserve.engine.fairness import OUTPUT_TOKEN_COST, TenantQueues, TokenBuckets
from peftserve.engine.request import FinishReason, SamplingParams, TenantLimits
from peftserve.engine.scheduler import Scheduler
from peftserve.engine.sequence import Sequence
from peftserve.errors import CapacityExceeded
from tests.engine.conftest import request


def seq(rid: str, tenant: str, n: int = 4, **limits) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(), tenant=tenant, limits=TenantLimits(**limits))


def step(s: Scheduler) -> list[str]:
    """Schedule, then do what the engine does: count computed tokens and sample one token each."""
    plan = s.schedule()
    for chunk in plan.chunks:
        chunk.seq.num_computed += chunk.num_tokens
        if chunk.sample:
            chunk.seq.output_ids.append(0)
    return [seq.request_id for seq in plan.admitted]


def finish_oldest(s: Scheduler) -> None:
    s.finish(s.running[0], FinishReason.LENGTH)


@pytest.mark.parametrize(("policy", "b_admitted_after"), [("fair", 1), ("fcfs", 19)])
def test_a_flooding_tenant_does_not_make_the_others_wait(policy, b_admitted_after) -> None:
    s = Scheduler(num_blocks=100, block_size=4, max_batched_tokens=64, max_running=2, max_slot_adapters=0)
    s.waiting.policy = policy
    for i in range(20):
        s.add(seq(f"a{i}", "flood"))
    assert step(s) == ["a0", "a1"]
    s.add(seq("b0", "quiet"))
    admitted: list[str] = []
    while "b0" not in admitted:
        finish_oldest(s)
        admitted += step(s)
    # fair: the quiet tenant takes the first free place; fcfs: it waits for the 18 earlier requests.
    assert admitted.index("b0") + 1 == b_admitted_after


def test_service_is_shared_evenly_between_backlogged_tenants() -> None:
    s = Scheduler(num_blocks=400, block_size=4, max_batched_tokens=64, max_running=4, max_slot_adapters=0)
    for i in range(30):
        s.add(seq(f"a{i}", "a"))
        if i < 10:
            s.add(seq(f"b{i}", "b"))
    order: list[str] = []
    while len(order) < 20:
        order += step(s)
        finish_oldest(s)
    # while both have work, admissions alternate: b gets its 10 among the first 20
    assert sum(r.startswith("b") for r in order[:20]) == 10


def test_a_returning_tenant_gets_no_credit_for_its_time_away() -> None:
    q = TenantQueues("fair")
    busy, idle = seq("x", "busy"), seq("y", "idle")
    q.push(busy)
    q.charge("busy", 100, decode=False)
    q.charge("idle", 5, decode=False)  # served long ago, then away
    q.push(idle)
    assert q.counters["idle"] == 100  # lifted to the least active counter, not left at 5
    q.charge("idle", 1, decode=True)
    assert q.counters["idle"] == 100 + OUTPUT_TOKEN_COST
    for s in (busy, idle):
        q.remove(s)
    q.push(seq("z", "later"))  # the engine was idle: counters restart
    assert q.counters == {"later": 0.0}


def test_a_tenant_never_runs_more_than_its_running_limit() -> None:
    s = Scheduler(num_blocks=100, block_size=4, max_batched_tokens=64, max_running=8, max_slot_adapters=0)
    for i in range(6):
        s.add(seq(f"a{i}", "a", max_running=2))
    s.add(seq("b0", "b"))
    assert sorted(step(s)) == ["a0", "a1", "b0"]
    assert step(s) == []  # a is at its limit; its other requests wait
    finish_oldest(s)
    assert step(s) == ["a2"]


def test_a_preempted_request_keeps_its_tenant_s_place() -> None:
    s = Scheduler(num_blocks=4, block_size=4, max_batched_tokens=64, max_running=8, max_slot_adapters=0)
    old, young = seq("old", "a", n=8), seq("young", "b", n=7)
    s.add(old)
    s.add(young)
    step(s)
    before = dict(s.waiting.counters)
    plan = s.schedule()  # old's next token needs a block: young is preempted
    assert plan.preempted == [young]
    assert s.waiting.counters["b"] == before["b"]  # not charged for its decode, not lifted on requeue
    assert s.waiting.counters["a"] == before["a"] + OUTPUT_TOKEN_COST


def test_token_buckets_refill_and_give_back() -> None:
    now = [0.0]
    buckets = TokenBuckets(clock=lambda: now[0])
    assert buckets.take("t", 600, per_minute=1000) is None
    assert buckets.take("t", 600, per_minute=1000) == pytest.approx(12.0)  # 200 missing at 1000/min
    now[0] = 12.0
    assert buckets.take("t", 600, per_minute=1000) is None
    buckets.give_back("t", 500, per_minute=1000)
    assert buckets.take("t", 500, per_minute=1000) is None
    assert buckets.take("u", 5000, per_minute=1000) is None  # larger than a minute: runs from a full bucket
    assert buckets.take("u", 1, per_minute=1000) == pytest.approx(240.06)


def test_engine_limits_are_resource_exhausted_with_a_retry_hint(make_engine) -> None:
    engine, _, _ = make_engine(tenant_max_queued=2, tenant_tokens_per_minute=100)
    engine.add_request(request("a", [5] * 10, max_new_tokens=20))
    engine.add_request(request("b", [5] * 10, max_new_tokens=20))
    with pytest.raises(CapacityExceeded, match="2 requests waiting") as queued:
        engine.add_request(request("c", [5] * 10, max_new_tokens=20))
    assert queued.value.retry_after_s == 1.0
    other = request("d", [5] * 10, max_new_tokens=20)
    other.tenant = "other"
    engine.add_request(other)  # another tenant's queue is its own
    while engine.has_unfinished():  # the two requests took 60 of the 100 tokens
        engine.step()
    with pytest.raises(CapacityExceeded, match="100 tokens per minute") as rate:
        engine.add_request(request("e", [5] * 30, max_new_tokens=30))
    assert 0 < rate.value.retry_after_s <= 60
    for rid in ("f", "g"):  # 120 tokens within a minute: over the default, within this caller's key's
        vip = request(rid, [5] * 30, max_new_tokens=30)
        vip.tenant, vip.limits = "vip", TenantLimits(tokens_per_minute=10_000)
        engine.add_request(vip)


@pytest.mark.parametrize(("policy", "quiet_first_chunk"), [("fair", 4), ("fcfs", 0)])
def test_prompts_under_way_share_the_budget_with_admissions_fairly(policy, quiet_first_chunk) -> None:
    s = Scheduler(num_blocks=100, block_size=4, max_batched_tokens=8, max_running=8, max_slot_adapters=0)
    s.waiting.policy = policy
    s.add(seq("long", "flood", n=40))
    step(s)  # the long prompt's first chunk: its tenant has now been served 8 tokens
    s.add(seq("short", "quiet", n=4))
    plan = s.schedule()
    chunks = {c.seq.request_id: c.num_tokens for c in plan.chunks}
    # fair: the quiet tenant's whole prompt goes first, the long prompt takes the rest of the budget;
    # fcfs: the prompt under way takes the whole budget and the new request waits.
    assert chunks.get("short", 0) == quiet_first_chunk and chunks["long"] == 8 - quiet_first_chunk
