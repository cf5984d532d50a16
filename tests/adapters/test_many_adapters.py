"""500 registered adapters, 8 device slots, a power-law request mix (engine level, through AsyncEngine).

Every output equals the same adapter served alone (a second engine, one request at a time), a sample
also equals PEFT; slots and the host cache evict, never a version a running request holds; concurrent
cold requests for one adapter cause exactly one load.
"""

from __future__ import annotations

import asyncio
import copy
import random
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load, save

from peftserve.adapters import AdapterManager
from peftserve.adapters.slots import DeviceSlots
from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from peftserve.store import AdapterStore
from tests.engine.conftest import random_prompts
from tests.engine.test_adapter_fidelity import reference_run
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.uploads import chunks

NUM_ADAPTERS = 500
SLOTS = 8
REQUESTS = 160
NEW_TOKENS = 6
ZIPF_S = 1.1
PEFT_SAMPLE = 4
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def adapter_files(template: dict[str, bytes], seed: int) -> dict[str, bytes]:
    """The template adapter (rank 2 on q_proj, v_proj) with seeded random weights."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) * 0.3 for k, v in load(template[WEIGHTS]).items()}
    return {CONFIG: template[CONFIG], WEIGHTS: save(state)}


def test_power_law_over_500_adapters_with_8_slots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base, _ = build_tiny_model("llama")
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "template")
    template = {name: (tmp_path / "template" / name).read_bytes() for name in (CONFIG, WEIGHTS)}

    evicted_while_held: list[str] = []
    real_evict = DeviceSlots._evict

    def checked_evict(self: DeviceSlots, key: str) -> None:
        if self._refs.get(key):
            evicted_while_held.append(key)
        real_evict(self, key)

    monkeypatch.setattr(DeviceSlots, "_evict", checked_evict)

    model, tokenizer = build_tiny_model("llama")
    one_adapter = 2 * (2 * (64 + 64) + 2 * (64 + 32)) * 4  # 2 layers, rank 2 on q and v, fp32 bytes
    manager = AdapterManager(model, SLOTS, "cpu", torch.float32, host_cache_bytes=40 * one_adapter)
    store = AdapterStore(tmp_path / "store", max_adapters_per_tenant=NUM_ADAPTERS)
    config = EngineConfig(kv_cache_mb=2, block_size=4, max_running=16, max_batched_tokens=256)
    front = AsyncEngine(LLMEngine.from_model(model, tokenizer, config, adapters=manager, store=store))
    prompts = random_prompts([4, 7, 5, 9], base.config.vocab_size, seed=5)
    rng = random.Random(0)
    weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(NUM_ADAPTERS)]
    picks = rng.choices(range(NUM_ADAPTERS), weights, k=REQUESTS)

    async def generate(rid: str, index: int, prompt: int) -> list[int]:
        request = GenerationRequest(
            rid,
            prompt_token_ids=prompts[prompt],
            sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
            adapters=(AdapterRef(f"acme/a{index}"),),
        )
        return [t async for out in front.generate(request) for t in out.token_ids]

    async def main() -> tuple[list[list[int]], int]:
        for i in range(NUM_ADAPTERS):
            await front.admin.upload("acme", f"a{i}", chunks(adapter_files(template, i)))
        results = await asyncio.gather(*(generate(f"r{n}", i, n % 4) for n, i in enumerate(picks)))
        cold = NUM_ADAPTERS - 1
        assert manager.tier(f"acme/a{cold}@v1") == "disk"
        loads = manager.host.stats.loads
        same = await asyncio.gather(*(generate(f"cold{n}", cold, 0) for n in range(16)))
        assert manager.host.stats.loads == loads + 1  # 16 concurrent cold requests, one load
        assert all(tokens == same[0] for tokens in same)
        return results, cold

    try:
        results, cold = asyncio.run(main())
    finally:
        front.shutdown()

    assert not evicted_while_held
    assert manager.slots.stats.evictions > 0 and manager.host.stats.evictions > 0
    assert len(set(picks)) > 2 * SLOTS

    # The same adapters served alone: a second engine over the same store, one request at a time.
    solo_model, _ = build_tiny_model("llama")
    solo_manager = AdapterManager(solo_model, 1, "cpu", torch.float32)
    solo_manager.scan(AdapterStore(tmp_path / "store"))
    solo = LLMEngine.from_model(
        solo_model, tokenizer, EngineConfig(kv_cache_mb=1, block_size=4), adapters=solo_manager
    )
    alone: dict[tuple[int, int], list[int]] = {}
    for n, index in enumerate(picks + [cold]):
        prompt = n % 4 if n < REQUESTS else 0
        if (index, prompt) not in alone:
            request = GenerationRequest(
                "solo",
                prompt_token_ids=prompts[prompt],
                sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
                adapters=(AdapterRef(f"acme/a{index}"),),
            )
            alone[(index, prompt)] = solo.generate_all([request])["solo"].token_ids
    for n, (index, tokens) in enumerate(zip(picks, results, strict=True)):
        assert tokens == alone[(index, n % 4)], f"request {n} on adapter a{index}"
    solo_manager.close()

    for index in sorted(set(picks))[:: max(1, len(set(picks)) // PEFT_SAMPLE)][:PEFT_SAMPLE]:
        folder = tmp_path / "store" / "acme" / f"a{index}" / "v1"
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        n = picks.index(index)
        assert results[n] == reference_run(reference, prompts[n % 4], NEW_TOKENS)[0], f"a{index} vs PEFT"
