"""Engine test helpers: tiny models, reference generation, request builders."""

from __future__ import annotations

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams
from tests.helpers.tiny_models import build_tiny_model


def reference_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generate, EOS ignored."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=model.config.pad_token_id,
    )
    return out[0, len(prompt) :].tolist()


def random_prompts(lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def request(rid: str, prompt: list[int], **sampling) -> GenerationRequest:
    sampling.setdefault("ignore_eos", True)
    return GenerationRequest(request_id=rid, prompt_token_ids=prompt, sampling=SamplingParams(**sampling))


@pytest.fixture
def make_engine():
    """make_engine(family, **EngineConfig fields) -> (engine, reference model, tokenizer)."""

    def make(family: str = "llama", **config) -> tuple[LLMEngine, object, object]:
        config.setdefault("kv_cache_mb", 1)
        config.setdefault("block_size", 4)
        model, tokenizer = build_tiny_model(family)
        reference, _ = build_tiny_model(family)
        return LLMEngine.from_model(model, tokenizer, EngineConfig(**config)), reference, tokenizer

    return make
