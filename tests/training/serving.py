"""Serve trained adapters with the real engine and compare with PEFT's own forward."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel

from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from peftserve.model.loader import load_base_model
from tests.engine.conftest import Recorded, run_recording


def engine_with(base: str | Path, adapters: dict[str, Path]) -> LLMEngine:
    """An fp32 CPU engine on `base` with every adapter registered."""
    loaded = load_base_model(str(base), "cpu", "float32")
    manager = AdapterManager(loaded.model, num_slots=max(1, len(adapters)), device="cpu", dtype=torch.float32)
    for adapter_id, path in adapters.items():
        manager.register(adapter_id, path)
    config = EngineConfig(kv_cache_mb=8, block_size=4, max_batched_tokens=256)
    return LLMEngine.from_model(loaded.model, loaded.tokenizer, config, adapters=manager)


def ask_all(
    engine: LLMEngine, questions: dict[str, tuple[str, str]], max_new_tokens: int = 48
) -> dict[str, Recorded]:
    """request id -> greedy completion and logits, for {request id: (adapter id, prompt)}, in one batch."""
    requests = [
        GenerationRequest(
            request_id=rid,
            prompt_token_ids=engine.tokenize(prompt),
            sampling=SamplingParams(max_new_tokens=max_new_tokens),
            adapters=(AdapterRef(adapter_id),),
        )
        for rid, (adapter_id, prompt) in questions.items()
    ]
    return run_recording(engine, [requests])


def peft_reference(base: str | Path, adapter: Path) -> PeftModel:
    """PEFT's own model for the adapter alone, on a fresh fp32 copy of the base."""
    loaded = load_base_model(str(base), "cpu", "float32")
    return PeftModel.from_pretrained(loaded.model, adapter).eval()
