"""Hot swap under load (engine level, through AsyncEngine and its AdapterAdmin).

While 21 streaming requests run, adapters are replaced, pinned, unloaded and deleted: no request fails,
and every response equals PEFT's output for the adapter version it started with. Nothing waits for the
running requests, and superseded or deleted versions leave memory when their last request ends.
"""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel

import peftserve.adapters.manager as manager_module
import peftserve.runner.model_runner as model_runner
from peftserve.adapters import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from peftserve.errors import AdapterNotFound
from peftserve.store import AdapterStore
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts
from tests.engine.test_adapter_fidelity import reference_run
from tests.helpers.tiny_models import build_tiny_model
from tests.helpers.uploads import chunks

NEW_TOKENS = 64
STEP_DELAY_S = 0.004
"""A pause per engine step, so the admin operations land while every phase's streams still run."""


def files_of(folder: Path) -> AsyncIterator[tuple[str, bytes]]:
    return chunks({p.name: p.read_bytes() for p in folder.iterdir()})


@pytest.fixture
def slow_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    real = model_runner.ModelRunner.execute

    def execute(self, step):
        time.sleep(STEP_DELAY_S)
        return real(self, step)

    monkeypatch.setattr(model_runner.ModelRunner, "execute", execute)


def test_replace_pin_unload_delete_while_streams_run(tmp_path: Path, slow_steps: None) -> None:
    base, _ = build_tiny_model("llama")
    dirs = {
        "a1": pf.make_lora_patterns(base, "llama", tmp_path / "a1", seed=1),
        "a2": pf.make_lora_patterns(base, "llama", tmp_path / "a2", seed=9),
        "b": pf.make_lora_layers(base, "llama", tmp_path / "b"),
        "p": pf.make_prefix(base, tmp_path / "p", projection=True),
    }
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=4, device="cpu", dtype=torch.float32)
    store = AdapterStore(tmp_path / "store")
    config = EngineConfig(kv_cache_mb=2, block_size=4, max_batched_tokens=256, max_running=32)
    front = AsyncEngine(LLMEngine.from_model(model, tokenizer, config, adapters=manager, store=store))
    admin = front.admin
    assert admin is not None
    prompts = random_prompts([5, 9, 13, 7], base.config.vocab_size, seed=3)
    started: list[asyncio.Event] = []

    async def stream(rid: str, adapter: str | None, prompt: int) -> list[int]:
        request = GenerationRequest(
            rid,
            prompt_token_ids=prompts[prompt],
            sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
            adapters=(AdapterRef(f"acme/{adapter}"),) if adapter else (),
        )
        first = asyncio.Event()
        started.append(first)
        tokens: list[int] = []
        async for out in front.generate(request):
            tokens += out.token_ids
            first.set()
        return tokens

    async def phase(tasks: dict, name: str, plan: list[tuple[str | None, str | None, int]]) -> None:
        """Start streams (adapter, the version they must get, prompt) and wait until each has a token."""
        for i, (adapter, version, prompt) in enumerate(plan):
            tasks[(f"{name}-{i}", version, prompt)] = asyncio.create_task(
                stream(f"{name}-{i}", adapter, prompt)
            )
        await asyncio.sleep(0)
        await asyncio.gather(*(e.wait() for e in started))

    async def main() -> dict:
        for name, folder in (("a", dirs["a1"]), ("b", dirs["b"]), ("p", dirs["p"])):
            await admin.upload("acme", name, files_of(folder))
        tasks: dict = {}
        await phase(
            tasks,
            "one",
            [
                ("a", "a1", 0),
                ("a", "a1", 1),
                ("a", "a1", 2),
                ("b", "b", 0),
                ("b", "b", 1),
                ("b", "b", 3),
                ("p", "p", 0),
                ("p", "p", 2),
            ],
        )

        replaced = await admin.upload("acme", "a", files_of(dirs["a2"]))
        assert replaced.version == "v2"
        assert (await admin.get("acme", "a")).active_requests == 3  # phase one still runs on v1
        pinned = await admin.load("acme", "b", pin=True)
        assert pinned.pinned and pinned.tier == "device"
        assert (await admin.unload("acme", "p")).active_requests == 2
        await phase(
            tasks,
            "two",
            [
                ("a", "a2", 0),
                ("a", "a2", 1),
                ("a", "a2", 3),
                ("a", "a2", 2),
                ("b", "b", 2),
                ("b", "b", 0),
                ("p", "p", 1),
                ("p", "p", 3),
            ],
        )

        await admin.delete("acme", "b")
        with pytest.raises(AdapterNotFound):
            await stream("late-b", "b", 0)
        started.pop()
        unloaded = await admin.unload("acme", "a")
        assert unloaded.active_requests == 7 and not unloaded.pinned
        await phase(
            tasks, "three", [("a", "a2", 0), ("a", "a2", 2), ("a", "a2", 1), (None, None, 0), (None, None, 3)]
        )
        assert sum(not t.done() for t in tasks.values()) >= 16  # the operations overlapped the streams
        return {key: await task for key, task in tasks.items()}

    try:
        results = asyncio.run(main())
    finally:
        front.shutdown()

    assert len(results) == 21
    references = {name: PeftModel.from_pretrained(copy.deepcopy(base), d).eval() for name, d in dirs.items()}
    references[None] = base
    cache: dict = {}
    for (rid, version, prompt), tokens in results.items():
        if (version, prompt) not in cache:
            cache[(version, prompt)] = reference_run(references[version], prompts[prompt], NEW_TOKENS)[0]
        assert tokens == cache[(version, prompt)], f"{rid} ({version}, prompt {prompt})"

    # Everything ended: the superseded, deleted and unloaded versions left host and device memory.
    for key in ("acme/a@v1", "acme/a@v2", "acme/b@v1", "acme/p@v1"):
        assert manager.tier(key) == "disk", key
    assert manager.registry.holds("acme/a") == manager.registry.holds("acme/b") == 0
    assert not (store.root / "acme" / "b").exists()
    assert [v.manifest.version for v in store.scan() if v.manifest.adapter_id == "acme/a"] == ["v1", "v2"]


def test_a_cold_load_stalls_nobody_else(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While one request waits for its adapter to load from disk, other requests run to completion."""
    base, _ = build_tiny_model("llama")
    cold_dir = pf.make_lora_layers(base, "llama", tmp_path / "cold")
    warm_dir = pf.make_lora_patterns(base, "llama", tmp_path / "warm")
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=2, device="cpu", dtype=torch.float32)
    config = EngineConfig(kv_cache_mb=1, block_size=4)
    front = AsyncEngine(
        LLMEngine.from_model(model, tokenizer, config, adapters=manager, store=AdapterStore(tmp_path / "s"))
    )
    prompt = random_prompts([6], base.config.vocab_size, seed=1)[0]
    gate = threading.Event()
    real_load = manager_module.load_adapter

    def gated_load(*args, **kwargs):
        assert gate.wait(30), "the test never opened the gate"
        return real_load(*args, **kwargs)

    async def run(rid: str, adapter: str | None) -> list[int]:
        request = GenerationRequest(
            rid,
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_new_tokens=8, ignore_eos=True),
            adapters=(AdapterRef(adapter),) if adapter else (),
        )
        return [t async for out in front.generate(request) for t in out.token_ids]

    async def main() -> tuple[list[int], list[int]]:
        await front.admin.upload("acme", "cold", files_of(cold_dir))
        await front.admin.upload("acme", "warm", files_of(warm_dir))
        await front.admin.unload("acme", "cold")  # on disk only now
        monkeypatch.setattr(manager_module, "load_adapter", gated_load)
        cold = asyncio.create_task(run("cold", "acme/cold"))
        warm = await asyncio.wait_for(asyncio.gather(run("warm", "acme/warm"), run("base", None)), 30)
        assert not cold.done() and manager.tier("acme/cold@v1") == "disk"
        gate.set()
        return await cold, warm[0]

    try:
        cold_tokens, warm_tokens = asyncio.run(main())
    finally:
        gate.set()
        front.shutdown()
    for folder, tokens in ((cold_dir, cold_tokens), (warm_dir, warm_tokens)):
        reference = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
        assert tokens == reference_run(reference, prompt, 8)[0]
