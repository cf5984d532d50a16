"""The prefix cache through the engine: outputs equal those without it, and nothing crosses identities.

Greedy fp32 on a tiny Llama with block size 4: every request's tokens equal the cache-off run's and its
logprobs are within 1e-4 (a cached prefix changes how the rest is chunked, so logits may differ in the
last bits). Covered: multi-turn chats on the base model, LoRA, AdaLoRA, prefix tuning, SHiRA, DoRA, VeRA
and a mixture in two tenants that share the same system prompt tokens, prompts ending mid-block, prefix
tuning's 5 virtual tokens across block boundaries, chunked prefill, preemption, one prompt sent twice at
once (computed once), a replaced and a deleted adapter version.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.prefix_cache import block_digests
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts
from tests.engine.test_batch_isolation import run_waves
from tests.helpers.tiny_models import build_tiny_model

TOL = 1e-4
NEW_TOKENS = 6
TENANTS = ("acme", "globex")
USES = ("base", "lora", "adalora", "prefix", "shira", "dora", "vera", "mix")
VOCAB = 320


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefix-cache")
    base, _ = build_tiny_model("llama")
    return {
        "lora": pf.make_lora_patterns(base, "llama", root / "lora"),
        "lora-v2": pf.make_lora_patterns(base, "llama", root / "lora-v2", seed=9),
        "adalora": pf.make_adalora(base, "llama", root / "adalora"),
        "prefix": pf.make_prefix(base, root / "prefix", projection=False),
        "shira": pf.make_shira(base, "llama", root / "shira"),
        "dora": pf.make_dora(base, "llama", root / "dora"),
        "vera": pf.make_vera(base, "llama", root / "vera"),
    }


def make_engine(dirs: dict[str, Path], prefix_cache: str = "on", **config) -> LLMEngine:
    """Every tenant registers the same adapter files under its own ids."""
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=12, device="cpu", dtype=torch.float32)
    for tenant in TENANTS:
        for name in ("lora", "adalora", "prefix", "shira", "dora", "vera"):
            manager.register(f"{tenant}/{name}", dirs[name])
    config = {"kv_cache_mb": 1, "block_size": 4, "max_batched_tokens": 40, **config}
    engine_config = EngineConfig(prefix_cache=prefix_cache, **config)
    return LLMEngine.from_model(model, tokenizer, engine_config, adapters=manager)


def adapters_of(tenant: str, use: str) -> tuple[AdapterRef, ...]:
    if use == "base":
        return ()
    if use == "mix":
        return (AdapterRef(f"{tenant}/lora", 0.6), AdapterRef(f"{tenant}/shira", 0.4))
    return (AdapterRef(f"{tenant}/{use}"),)


def request(
    rid: str, tenant: str, use: str, prompt: list[int], new_tokens: int = NEW_TOKENS
) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, logprobs=True)
    adapters = adapters_of(tenant, use)
    return GenerationRequest(rid, prompt_token_ids=prompt, sampling=params, adapters=adapters, tenant=tenant)


def assert_same(got: dict[str, dict], want: dict[str, dict]) -> None:
    assert got.keys() == want.keys()
    for rid, w in want.items():
        assert got[rid]["tokens"] == w["tokens"], rid
        err = max(abs(a - b) for a, b in zip(got[rid]["logprobs"], w["logprobs"], strict=True))
        assert err <= TOL, f"{rid}: max |Δlogprob| {err:.2e}"


def hit_tokens(engine: LLMEngine) -> int:
    return engine.prefix_cache_stats().hit_tokens


def check_tables(engine: LLMEngine) -> int:
    """Every block a running sequence holds is its own: it wrote it, or the block is cached under the
    digest of the sequence's own prefix. Returns how many blocks two sequences share."""
    bs = engine.scheduler.block_size
    pool = engine.scheduler.allocator
    holders: dict[int, list[tuple[int, bytes | None]]] = {}
    for seq in engine.scheduler.running:
        own = block_digests(seq, seq.num_computed // bs, bs)
        for j, block in enumerate(seq.blocks):
            if j < seq.num_cached // bs:
                assert pool.digest_of(block) == own[j], f"{seq.request_id} holds another prefix's block"
            holders.setdefault(block, []).append((j, own[j] if j < len(own) else None))
    shared = {b: h for b, h in holders.items() if len(h) > 1}
    for block, held in shared.items():  # a full block of the same identity and tokens, never a partial one
        assert held[0][1] is not None and all(h == held[0] for h in held), f"block {block} shared by {held}"
    return len(shared)


def chat_turns(engine: LLMEngine) -> tuple[dict[str, dict], list[int], int]:
    """Two turns of 32 chats (every tenant and use twice) on one 13-token system prompt: turn 2 is turn
    1's prompt, its answer and a new message. Returns every result, the hit tokens after each turn and
    how many blocks sequences shared over all steps (checked by check_tables before every step)."""
    system = random_prompts([13], VOCAB, seed=11)[0]  # 3 full blocks and one token
    chats = [(t, u, i) for i in range(2) for t in TENANTS for u in USES]
    users = random_prompts([1 + (3 * k) % 7 for k in range(len(chats))], VOCAB, seed=12)
    first = [request(f"1-{t}-{u}-{i}", t, u, system + m) for (t, u, i), m in zip(chats, users, strict=True)]
    shared = []
    real_step = engine.step
    engine.step = lambda: (shared.append(check_tables(engine)), real_step())[1]
    half = len(first) // 2  # the second half (every identity again) runs when the first is cached
    results = run_waves(engine, [first[:half]]) | run_waves(engine, [first[half:]])
    hits = [hit_tokens(engine)]
    replies = random_prompts([2 + k % 5 for k in range(len(chats))], VOCAB, seed=13)
    second = [
        request(f"2{r.request_id[1:]}", r.tenant, u, r.prompt_token_ids + results[r.request_id]["tokens"] + m)
        for r, (_, u, _), m in zip(first, chats, replies, strict=True)
    ]
    results |= run_waves(engine, [second[half:], second[:half]])
    hits.append(hit_tokens(engine))
    return results, hits, sum(shared)


def test_multi_turn_chats_of_every_compute_form_and_two_tenants_equal_the_uncached_run(adapter_dirs) -> None:
    off = make_engine(adapter_dirs, prefix_cache="off")
    want, _, _ = chat_turns(off)
    assert off.prefix_cache_stats().hit_tokens == 0 and off.prefix_cache_stats().cached_blocks == 0

    on = make_engine(adapter_dirs)
    got, hits, shared = chat_turns(on)
    assert_same(got, want)
    # Turn 1: the second of each pair finds the 12 system tokens its twin cached; with prefix tuning's
    # 5 virtual tokens first, 4 blocks hold 11 system tokens. Turn 2 finds whole earlier turns.
    pairs = len(TENANTS) * len(USES)
    assert hits[0] == (pairs - len(TENANTS)) * 12 + len(TENANTS) * 11
    assert hits[1] - hits[0] > 2 * pairs * 12
    assert shared > 0  # running sequences did share blocks (and only their own identity's)
    assert on.stats().kv_blocks_used == 0 and on.prefix_cache_stats().cached_blocks > 0


def running_blocks(engine: LLMEngine, rid: str) -> list[int]:
    return list(engine.scheduler.get(rid).blocks)


def test_blocks_never_cross_tenants_nor_adapters(adapter_dirs) -> None:
    engine = make_engine(adapter_dirs)
    prompt = random_prompts([17], VOCAB, seed=3)[0]  # 4 full blocks and one token
    uses = [("acme", "base"), ("globex", "base"), ("acme", "lora"), ("globex", "lora"), ("acme", "prefix")]
    tables = {}
    for tenant, use in uses:  # one at a time, each after the others' blocks are cached
        rid = f"{tenant}-{use}"
        engine.add_request(request(rid, tenant, use, prompt))
        engine.step()
        tables[rid] = running_blocks(engine, rid)
        while engine.has_unfinished():
            engine.step()
    assert hit_tokens(engine) == 0  # same tokens, five identities: nothing found

    engine.add_request(request("acme-base-again", "acme", "base", prompt + [5]))
    engine.step()
    assert running_blocks(engine, "acme-base-again")[:4] == tables["acme-base"][:4]
    assert hit_tokens(engine) == 16


def test_chunked_prefill_and_preemption_equal_the_uncached_run(adapter_dirs) -> None:
    # 30 blocks of 4 tokens and 8 tokens a step for 12 requests on one 22-token prefix: prompts are
    # prefilled in chunks while others join, decodes preempt the youngest, cached blocks are evicted.
    shared = random_prompts([22], VOCAB, seed=21)[0]
    tails = random_prompts([1 + k % 4 for k in range(12)], VOCAB, seed=22)
    uses = ["base", "lora", "prefix", "mix"]
    requests = [
        request(f"r{k}-{uses[k % 4]}", "acme", uses[k % 4], shared + tail, new_tokens=8)
        for k, tail in enumerate(tails)
    ]
    waves = [requests[k : k + 2] for k in range(0, 12, 2)]
    config = {"kv_cache_mb": 0.03, "max_batched_tokens": 8, "max_running": 8}
    off = make_engine(adapter_dirs, prefix_cache="off", **config)
    want = run_waves(off, waves, every=2)
    on = make_engine(adapter_dirs, **config)
    got = run_waves(on, waves, every=2)
    assert_same(got, want)
    assert on.scheduler.num_preemptions > 0 and hit_tokens(on) > 0
    assert on.prefix_cache_stats().evictions > 0 and on.stats().kv_blocks_used == 0


def test_a_prompt_sent_twice_at_once_is_computed_once(adapter_dirs) -> None:
    # Two requests per identity (two tenants, three adapter uses) on one 21-token prompt, all at once:
    # each second one waits for its twin's 5 full blocks instead of computing them too.
    shared = random_prompts([21], VOCAB, seed=31)[0]
    tails = random_prompts([1 + k % 3 for k in range(12)], VOCAB, seed=32)
    twins = [(t, u, i) for t in TENANTS for u in ("base", "lora", "mix") for i in range(2)]
    requests = [
        request(f"{t}-{u}-{i}", t, u, shared + tail) for (t, u, i), tail in zip(twins, tails, strict=True)
    ]
    off = make_engine(adapter_dirs, prefix_cache="off")
    want = run_waves(off, [requests])
    on = make_engine(adapter_dirs)
    got = run_waves(on, [requests])
    assert_same(got, want)
    assert hit_tokens(on) == len(twins) // 2 * 20


def test_a_replaced_or_deleted_version_never_finds_the_old_blocks(adapter_dirs) -> None:
    engine = make_engine(adapter_dirs)
    manager = engine.adapters.manager
    prompt = random_prompts([14], VOCAB, seed=5)[0]

    def run(rid: str, cached: int = 0) -> list[int]:
        done = engine.generate_all([request(rid, "acme", "lora", prompt)])[rid]
        assert done.cached_tokens == cached, rid  # what its usage reports
        return done.token_ids

    v1 = run("v1")
    assert run("v1-again", cached=12) == v1 and hit_tokens(engine) == 12
    manager.register("acme/lora", adapter_dirs["lora-v2"])  # a new version of the same id
    v2 = run("v2")
    assert hit_tokens(engine) == 12, "the new version found the old version's blocks"
    fresh = make_engine({**adapter_dirs, "lora": adapter_dirs["lora-v2"]}, prefix_cache="off")
    assert v2 == fresh.generate_all([request("v2", "acme", "lora", prompt)])["v2"].token_ids != v1

    assert engine.prefix_cache_stats().cached_blocks == 8  # 19 computed entries: 4 blocks per version
    manager.remove("acme/lora")  # delete: both versions' blocks go at the next step
    engine.step()
    assert engine.prefix_cache_stats().cached_blocks == 0
    manager.register("acme/lora", adapter_dirs["lora"])  # v1's files again, as a new version (v3)
    assert run("v3") == v1 and hit_tokens(engine) == 12
