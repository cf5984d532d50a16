"""Batch isolation: nothing computed for one request reaches another request's output.

A request whose values overflow (a hostile mixture weight, an adapter with extreme weights) ends with
an error of its own, and every other request in the same steps, before and after it, gets exactly
what it gets without it: base rows, other tenants' LoRA, prefix and sparse adapters, in decode and in
prefill. The input bounds refuse such requests at the door; these tests lift the bounds to prove the
engine itself keeps rows apart.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftserve.adapters.peft_format as peft_format
import peftserve.engine.request as engine_request
from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.prefix_cache import block_digests
from peftserve.engine.request import AdapterRef, FinishReason, GenerationRequest, SamplingParams
from peftserve.errors import NonFiniteOutput
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts
from tests.helpers.tiny_models import build_tiny_model

NEW_TOKENS = 12
VICTIMS = ("base", "lora", "prefix", "shira", "mix", "dora", "ia3", "loha", "lokr", "vera", "mix-kinds")
"""What the other requests use: base model, another tenant's LoRA, prefix tuning, a sparse delta, a
benign mixture (a LoRA and the sparse delta), each other served kind and a mixture across kinds."""


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("isolation")
    base, _ = build_tiny_model("llama")
    dirs = {
        "lora": pf.make_lora_patterns(base, "llama", root / "lora"),
        "prefix": pf.make_prefix(base, root / "prefix", projection=False),
        "shira": pf.make_shira(base, "llama", root / "shira"),
        "other": pf.make_lora_layers(base, "llama", root / "other"),
        "dora": pf.make_dora(base, "llama", root / "dora"),
        "ia3": pf.make_ia3(base, "llama", root / "ia3"),
        "loha": pf.make_loha(base, "llama", root / "loha"),
        "lokr": pf.make_lokr(base, "llama", root / "lokr"),
        "vera": pf.make_vera(base, "llama", root / "vera"),
    }
    # Finite but extreme: 1e38 (x scaling 5/3) is below float32's largest number and overflows the
    # first activation it touches.
    poisoned = root / "poisoned"
    shutil.copytree(dirs["other"], poisoned)
    state = load_file(poisoned / "adapter_model.safetensors")
    for key in state:
        if key.endswith("lora_B.weight"):
            state[key] = torch.full_like(state[key], 1e38)
    save_file(state, poisoned / "adapter_model.safetensors")
    dirs["poisoned"] = poisoned
    return dirs


@pytest.fixture
def no_input_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the hostile inputs in, as if the bounds at the door had a hole."""
    monkeypatch.setattr(peft_format, "MAX_MAGNITUDE", math.inf)
    monkeypatch.setattr(engine_request, "MAX_MIXTURE_WEIGHT", math.inf)


def make_engine(dirs: dict[str, Path], **config) -> LLMEngine:
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=len(dirs), device="cpu", dtype=torch.float32)
    for name, path in dirs.items():
        manager.register(name, path)
    config = {"kv_cache_mb": 1, "block_size": 4, "max_batched_tokens": 40, **config}
    return LLMEngine.from_model(model, tokenizer, EngineConfig(**config), adapters=manager)


def adapters_of(use: str) -> tuple[AdapterRef, ...]:
    if use == "base":
        return ()
    if use == "mix":
        return (AdapterRef("lora", 0.6), AdapterRef("shira", 0.4))
    if use == "mix-kinds":
        return (
            AdapterRef("dora", 0.5),
            AdapterRef("ia3", 0.7),
            AdapterRef("vera", -0.4),
            AdapterRef("lokr", 0.3),
        )
    if use == "mixture-poison":
        return (AdapterRef("other", 3e38), AdapterRef("lora", 1.0))
    if use == "adapter-poison":
        return (AdapterRef("poisoned"),)
    return (AdapterRef(use),)


def make_request(rid: str, use: str, prompt: list[int]) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    return GenerationRequest(rid, prompt_token_ids=prompt, sampling=params, adapters=adapters_of(use))


def run_waves(engine: LLMEngine, waves: list[list[GenerationRequest]], every: int = 3) -> dict[str, dict]:
    """Add wave i after i * `every` steps and run everything to the end: {request_id: result}."""
    results = {r.request_id: {"tokens": [], "logprobs": [], "finish": None} for w in waves for r in w}
    step = 0
    while step <= every * (len(waves) - 1) or engine.has_unfinished():
        if step % every == 0 and step // every < len(waves):
            for r in waves[step // every]:
                engine.add_request(r)
        for out in engine.step():
            res = results[out.request_id]
            res["tokens"] += out.token_ids
            res["logprobs"] += out.logprobs or ()
            if out.finished:
                res["finish"] = out.finish_reason
                res["error"] = out.error
        step += 1
    return results


def victims_wave(tag: str, seed: int) -> list[GenerationRequest]:
    prompts = random_prompts([3 + 4 * i for i in range(len(VICTIMS))], 320, seed=seed)
    pairs = enumerate(zip(VICTIMS, prompts, strict=True))
    return [make_request(f"{tag}{i}-{use}", use, p) for i, (use, p) in pairs]


@pytest.mark.parametrize("poison", ["mixture-poison", "adapter-poison"])
def test_an_overflowing_request_fails_alone(adapter_dirs, no_input_bounds, poison) -> None:
    # Wave 0: victims and a poisoned request prefill together. Wave 1 (3 steps later): new victims
    # prefill while the first poison decodes, and a second poison prefills while victims decode.
    # Wave 2: victims run on blocks the poisoned requests wrote and freed.
    poisons = [make_request(f"poison{i}", poison, p) for i, p in enumerate(random_prompts([9, 17], 320))]
    waves = [victims_wave("a", 1), victims_wave("b", 2), victims_wave("c", 3)]
    clean = run_waves(make_engine(adapter_dirs), waves)
    engine = make_engine(adapter_dirs)
    dirty = run_waves(engine, [waves[0] + poisons[:1], waves[1] + poisons[1:], waves[2]])

    for p in poisons:
        assert dirty[p.request_id]["finish"] is FinishReason.ERROR, "the poison did not overflow"
        assert isinstance(dirty[p.request_id]["error"], NonFiniteOutput)
        assert "NaN or Inf" in str(dirty[p.request_id]["error"])
    for rid, want in clean.items():
        got = dirty[rid]
        assert got["finish"] is FinishReason.LENGTH, rid
        assert got["tokens"] == want["tokens"], rid
        assert all(math.isfinite(x) for x in got["logprobs"]), rid
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) <= 1e-4, rid
    assert engine.stats().kv_blocks_used == 0


def poison_unwritten_slots(engine: LLMEngine) -> int:
    """Fill every KV slot with NaN that is neither a running sequence's computed entry nor in a cached
    block some waiting or running sequence may find (its own identity and tokens); returns how many."""
    cache = engine.runner.cache
    pool = engine.scheduler.allocator
    bs = cache.block_size
    live = torch.zeros(cache.null_slot + 1, dtype=torch.bool)
    live[cache.null_slot] = True  # the null slot is never written; it stays zero
    sequences = [*engine.scheduler.running, *engine.scheduler.waiting]
    for seq in engine.scheduler.running:
        for pos in range(seq.num_computed):
            live[seq.blocks[pos // bs] * bs + pos % bs] = True
    findable = {d for seq in sequences for d in block_digests(seq, seq.kv_len // bs, bs)}
    for block in range(pool.num_blocks):
        if pool.digest_of(block) in findable:
            live[block * bs : (block + 1) * bs] = True
    dead = (~live).nonzero()[:, 0]
    cache.keys[:, dead] = float("nan")
    cache.values[:, dead] = float("nan")
    return dead.numel()


def test_no_step_reads_a_slot_outside_its_own_context(adapter_dirs) -> None:
    """By construction: free blocks, unwritten slots, padding and other identities' cached blocks may
    hold anything at all.

    Before every step every KV slot that is not a running sequence's computed entry, nor in a cached
    block of a waiting or running sequence's own prefix, is set to NaN; a run with late joiners, chunked
    prefill and preemption (readmitted sequences find their own blocks) over every adapter kind is then
    identical, bit for bit, to the same run without it.
    """
    waves = [victims_wave("a", 4), victims_wave("b", 5), victims_wave("c", 6)]
    # 0.03 MB: 15 blocks of 4 tokens (512 bytes a token) for 33 requests of up to 55 tokens: preemptions.
    config = {"kv_cache_mb": 0.03, "max_batched_tokens": 24}
    adapter_dirs = {k: v for k, v in adapter_dirs.items() if k != "poisoned"}
    clean_engine = make_engine(adapter_dirs, **config)
    clean = run_waves(clean_engine, waves)
    assert clean_engine.scheduler.num_preemptions > 0

    engine = make_engine(adapter_dirs, **config)
    poisoned_slots = []
    real_step = engine.step

    def poisoned_step():
        poisoned_slots.append(poison_unwritten_slots(engine))
        return real_step()

    engine.step = poisoned_step
    dirty = run_waves(engine, waves)
    # Some steps find every block in use or findable: nothing to poison then, but most steps have some.
    assert sum(n > 0 for n in poisoned_slots) > 0.75 * len(poisoned_slots)
    assert engine.scheduler.num_preemptions == clean_engine.scheduler.num_preemptions
    for rid, want in clean.items():
        assert dirty[rid]["tokens"] == want["tokens"], rid
        assert dirty[rid]["logprobs"] == want["logprobs"], rid


def test_a_request_whose_adapter_finds_no_slot_waits_and_the_batch_carries_on(
    adapter_dirs, monkeypatch
) -> None:
    """Should the slots ever disagree with the scheduler's slot budget, only that request waits."""
    dirs = {k: adapter_dirs[k] for k in ("lora", "other")}
    prompts = random_prompts([6, 9, 5], 320, seed=8)
    requests = [make_request("lora", "lora", prompts[0]), make_request("base", "base", prompts[2])]
    requests.append(make_request("other", "other", prompts[1]))
    alone = {r.request_id: make_engine(dirs).generate_all([r])[r.request_id].token_ids for r in requests}

    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=1, device="cpu", dtype=torch.float32)
    for name, path in dirs.items():
        manager.register(name, path)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=1, block_size=4), adapters=manager
    )
    monkeypatch.setattr(engine.scheduler, "_slots_allow", lambda seq: True)  # a budget that overcommits
    done = engine.generate_all(requests)
    assert {rid: c.token_ids for rid, c in done.items()} == alone
    assert engine.scheduler.num_preemptions == 0 and engine.stats().kv_blocks_used == 0
