"""The prefix cache on its own (plain Python): identity, reuse, eviction, shares, removal, scheduling."""

from __future__ import annotations

from peftserve.engine.prefix_cache import BlockPool, block_digests, identity_digest
from peftserve.engine.request import FinishReason, SamplingParams
from peftserve.engine.scheduler import Scheduler
from peftserve.engine.sequence import HeldVersion, Sequence
from peftserve.engine.step import StepOutput

BS = 4


def seq(rid: str, tokens: list[int], tenant: str = "acme", **fields) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(), tenant=tenant, **fields)


def computed(pool: BlockPool, s: Sequence, hits: list[int] | None = None) -> Sequence:
    """Admit s into pool with its cached prefix, compute everything it has, index its full blocks."""
    hits = pool.lookup(s) if hits is None else hits
    pool.admit(s, hits, -(-s.kv_len // BS) - len(hits))
    s.num_computed = s.kv_len
    pool.cache_computed(s)
    return s


def test_the_identity_is_tenant_adapter_versions_contents_weights_and_prefix() -> None:
    lora = (HeldVersion("acme/a@v1", 1.0),)
    base = seq("x", [1], deltas=lora, adapter_contents=("w:1",))
    same = seq("y", [2, 3], deltas=lora, adapter_contents=("w:1",))
    assert identity_digest(base) == identity_digest(same)  # the tokens are not part of it
    others = [
        seq("t", [1], tenant="other", deltas=lora, adapter_contents=("w:1",)),
        seq("v", [1], deltas=(HeldVersion("acme/a@v2", 1.0),), adapter_contents=("w:1",)),
        seq("c", [1], deltas=lora, adapter_contents=("w:2",)),  # a version key back with other weights
        seq("w", [1], deltas=(HeldVersion("acme/a@v1", 0.5),), adapter_contents=("w:1",)),
        seq("m", [1], deltas=(*lora, HeldVersion("acme/b@v1", 0.1)), adapter_contents=("w:1", "w:3")),
        seq("p", [1], prefix_adapter="acme/a@v1", num_virtual=3, adapter_contents=("w:1",)),
        seq("b", [1]),  # the base model
    ]
    digests = {identity_digest(s) for s in [base, *others]}
    assert len(digests) == len(others) + 1


def test_digests_chain_over_every_earlier_token_with_virtual_tokens_first() -> None:
    a, b = seq("a", list(range(12))), seq("b", [*range(4), 99, *range(5, 12)])
    da, db = block_digests(a, 3, BS), block_digests(b, 3, BS)
    assert da[0] == db[0] and da[1] != db[1] and da[2] != db[2]  # one token differs: its block and on
    p = seq("p", list(range(6)), prefix_adapter="acme/p@v1", num_virtual=2)
    assert len(block_digests(p, 2, BS)) == 2  # 2 virtual + 6 real KV entries: two full blocks
    unprefixed = seq("u", [-1, -1, *range(6)])  # the virtual tokens' values come with the identity
    assert block_digests(unprefixed, 2, BS) != block_digests(p, 2, BS)


def test_full_computed_blocks_are_reused_never_the_last_token_nor_a_partial_block() -> None:
    pool = BlockPool(32, BS)
    first = computed(pool, seq("first", list(range(10))))  # blocks 0-1 full, block 2 holds 2 of 4
    assert pool.num_cached == 2
    longer = seq("longer", [*range(10), 50, 51, 52])
    hits = pool.lookup(longer)
    assert hits == first.blocks[:2]  # the partial third block is not shared
    assert pool.lookup(seq("exact", list(range(8)))) == first.blocks[:1]  # its last token is computed
    assert pool.lookup(seq("diverges", [0, 1, 2, 3, 4, 99, 6, 7, 8])) == first.blocks[:1]
    assert pool.lookup(seq("other tenant", list(range(10)), tenant="globex")) == []
    computed(pool, longer, hits)
    assert longer.num_cached == 8 and longer.blocks[:2] == first.blocks[:2]
    assert pool.counters.query_tokens == 10 + 13 and pool.counters.hit_tokens == 8


def test_caching_off_finds_nothing_and_indexes_nothing() -> None:
    pool = BlockPool(32, BS, caching=False)
    computed(pool, seq("a", list(range(10))))
    assert pool.lookup(seq("b", list(range(10)))) == [] and pool.num_cached == 0
    assert pool.counters.query_tokens == 0


def test_idle_blocks_are_evicted_lru_after_free_ones_and_never_while_in_use() -> None:
    pool = BlockPool(6, BS)
    a = computed(pool, seq("a", list(range(8))))  # 2 full blocks, both indexed
    b = computed(pool, seq("b", list(range(100, 108))))
    pool.free(a.blocks)
    assert pool.num_free == 4 and pool.num_cached == 4  # a's blocks are free but still findable
    c = seq("c", list(range(200, 206)))
    pool.admit(c, [], 2)  # the two never-used blocks go first
    assert set(c.blocks).isdisjoint(a.blocks + b.blocks) and pool.counters.evictions == 0
    d = seq("d", list(range(300, 304)))
    pool.admit(d, [], 1)  # then a's tail block: released last block first, so it is the oldest
    assert d.blocks == [a.blocks[1]] and pool.counters.evictions == 1
    assert pool.lookup(seq("a again", list(range(9)))) == [a.blocks[0]]
    pool.admit(seq("e", [1]), [], 1)
    assert pool.num_free == 0 and pool.counters.evictions == 2
    assert pool.lookup(seq("b again", list(range(100, 109)))) == b.blocks  # held by b: never evicted


def test_a_hit_on_an_idle_block_takes_it_out_of_the_free_queue() -> None:
    pool = BlockPool(4, BS)
    a = computed(pool, seq("a", list(range(8))))
    pool.free(a.blocks)
    again = seq("again", list(range(9)))
    hits = pool.lookup(again)
    assert pool.num_idle(hits) == 2
    pool.admit(again, hits, 1)
    assert pool.num_free == 1 and pool.num_used == 3
    pool.free(again.blocks)
    assert pool.num_free == 4 and pool.num_cached == 2


def test_one_tenant_never_holds_more_than_its_share() -> None:
    pool = BlockPool(20, BS, tenant_share=0.2)  # 4 blocks
    quiet = computed(pool, seq("quiet", list(range(8)), tenant="quiet"))
    for i in range(5):  # a noisy tenant's distinct prompts
        pool.free(computed(pool, seq(f"n{i}", [1000 * i + t for t in range(8)], tenant="noisy")).blocks)
    assert pool.tenant_blocks("noisy") == 4 and pool.tenant_blocks("quiet") == 2
    assert pool.counters.evictions == 6  # noisy's own oldest blocks made way
    assert pool.lookup(seq("quiet again", list(range(9)), tenant="quiet")) == quiet.blocks[:2]
    assert pool.lookup(seq("newest", [4000, 4001, 4002, 4003, 4004, 4005, 4006, 4007, 1], tenant="noisy"))
    held = computed(pool, seq("held", list(range(500, 520)), tenant="noisy"))
    assert pool.tenant_blocks("noisy") == 4 and held.num_indexed_blocks == 5  # in use: nothing to evict


def test_removed_versions_are_dropped_in_use_or_not() -> None:
    pool = BlockPool(16, BS)
    lora = {"deltas": (HeldVersion("acme/a@v1"),), "adapter_contents": ("w:1",)}
    idle = computed(pool, seq("idle", list(range(8)), **lora))
    pool.free(idle.blocks)
    running = computed(pool, seq("running", list(range(50, 58)), **lora))
    base = computed(pool, seq("base", list(range(8))))
    pool.drop_versions(["acme/a@v1"])
    assert pool.num_cached == 2 and pool.lookup(seq("base again", list(range(9)))) == base.blocks[:2]
    assert pool.lookup(seq("v1 again", list(range(9)), **lora)) == []
    assert pool.lookup(seq("v1 running", list(range(50, 59)), **lora)) == []
    pool.free(running.blocks)
    assert pool.num_free == 16 - len(base.blocks)


# -- through the scheduler -----------------------------------------------------------------------


def run(plan, s: Scheduler) -> None:
    """What the engine does after a step: the scheduler takes in what it computed; a token is sampled."""
    s.update(StepOutput(computed=tuple((c.seq, c.num_tokens) for c in plan.chunks)))
    for chunk in plan.chunks:
        if chunk.sample:
            chunk.seq.output_ids.append(7)


def scheduler(**kw) -> Scheduler:
    args = {"num_blocks": 64, "block_size": BS, "max_batched_tokens": 64, "max_running": 8}
    return Scheduler(**{**args, **kw}, max_slot_adapters=0)


def test_a_cached_prefix_is_neither_computed_nor_charged() -> None:
    s = scheduler()
    system = list(range(40, 60))  # 20 tokens: 5 full blocks
    first = seq("first", [*system, 1, 2])
    s.add(first)
    run(s.schedule(), s)
    s.finish(first, FinishReason.LENGTH)
    second = seq("second", [*system, 3])
    s.add(second)
    charged = s.waiting.counters["acme"]
    plan = s.schedule()
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(second, 1)]
    assert second.num_cached == 20 and second.num_computed == 20
    assert s.waiting.counters["acme"] == charged + 1


def test_a_prompt_being_computed_is_waited_for_not_computed_twice() -> None:
    s = scheduler(max_batched_tokens=8)
    system = list(range(100, 124))  # 6 blocks
    first, second = seq("first", [*system, 1]), seq("second", [*system, 2])
    other = seq("other", [*system, 3], tenant="globex")  # the same tokens, another tenant: no waiting
    s.add(first)
    run(s.schedule(), s)  # first: 8 of 25 tokens
    s.add(second)
    s.add(other)
    s.max_batched_tokens = 20
    plan = s.schedule()  # second fits, but first is computing the blocks after the 8 cached tokens
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("first", 17), ("other", 3)]
    assert list(s.waiting) == [second] and second.slot_waits == 0
    run(plan, s)
    s.max_batched_tokens = 64
    plan = s.schedule()  # first's prompt is all cached: second computes its last token only
    assert plan.admitted == [second] and second.num_cached == 24 and second.blocks[:6] == first.blocks[:6]
    assert [c.num_tokens for c in plan.chunks if c.seq is second] == [1]
    assert other.num_cached == 0 and not set(other.blocks) & set(first.blocks)


def test_the_wait_ends_when_the_prompt_being_computed_stops() -> None:
    s = scheduler(max_batched_tokens=8)
    system = list(range(100, 124))
    first, second = seq("first", [*system, 1]), seq("second", [*system, 2])
    s.add(first)
    run(s.schedule(), s)  # first: 8 of 25 tokens, 2 blocks cached
    s.add(second)
    s.max_batched_tokens = 20
    plan = s.schedule()
    assert [c.seq for c in plan.chunks] == [first] and list(s.waiting) == [second]
    s.finish(first, FinishReason.CANCELLED)  # before that step runs
    plan = s.schedule()  # nobody computes the rest now: second does, after what was cached
    assert plan.admitted == [second] and second.num_cached == 8
    assert [(c.seq, c.num_tokens) for c in plan.chunks] == [(second, 17)]


def test_a_prompt_diverging_from_one_being_computed_starts_from_the_chunks_computed_so_far() -> None:
    s = scheduler(max_batched_tokens=8)
    system = list(range(100, 124))
    first = seq("first", [*system, 1])
    second = seq("second", [*system[:16], 7, 7, 7, 7, 2])  # its fifth block differs from first's
    s.add(first)
    run(s.schedule(), s)
    s.add(second)
    plan = s.schedule()  # the budget goes to first's next chunk; second waits
    assert [c.seq for c in plan.chunks] == [first]
    run(plan, s)
    s.max_batched_tokens = 24
    plan = s.schedule()  # first: its last 9 tokens; second: admitted after its 16 cached tokens
    assert second in plan.admitted and second.num_cached == 16
    assert [(c.seq.request_id, c.num_tokens) for c in plan.chunks] == [("first", 9), ("second", 5)]
    assert second.blocks[:4] == first.blocks[:4]


def test_waiting_for_a_prefix_does_not_give_up_a_place_in_line_held_for_blocks() -> None:
    s = scheduler(num_blocks=10)
    system = list(range(100, 108))
    first = seq("first", [*system, 1])  # 3 blocks
    big = seq("big", [*system, *range(21)])  # 8 blocks: one more than first leaves
    small = seq("small", [5])
    for each in (first, big, small):
        s.add(each)
    plan = s.schedule()  # big lacks blocks before it could wait for first's: small stays behind it
    assert plan.admitted == [first] and list(s.waiting) == [big, small]


def test_a_preempted_sequence_finds_its_own_blocks_again() -> None:
    s = scheduler(num_blocks=6)
    old, young = seq("old", list(range(8))), seq("young", list(range(50, 57)))
    s.add(old)
    s.add(young)
    run(s.schedule(), s)  # 2 + 2 blocks
    run(s.schedule(), s)  # both decode
    run(s.schedule(), s)  # old grows to its third block
    plan = s.schedule()  # young's 9th entry needs a third block, old its tenth entry: young is preempted
    for _ in range(3):
        if young in plan.preempted:
            break
        run(plan, s)
        plan = s.schedule()
    assert young in plan.preempted
    run(plan, s)
    s.finish(old, FinishReason.LENGTH)
    plan = s.schedule()
    assert plan.admitted == [young] and young.num_cached == 8
    assert [c.num_tokens for c in plan.chunks] == [young.kv_len - 8]
