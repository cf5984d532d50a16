"""Engine test helpers: tiny models, reference generation, request builders."""

from __future__ import annotations

import pytest
import torch

import peftserve.runner.model_runner as model_runner
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


def reference_run(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding by full forward passes (PEFT's generate drops prefixes on transformers 5.24)."""
    ids = list(prompt)
    rows = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            rows.append(logits)
            ids.append(int(logits.argmax()))
    return ids[len(prompt) :], torch.stack(rows)


@pytest.fixture
def record_logits(monkeypatch):
    """Record the logits row the sampler sees for every request, in order."""
    seen: dict[str, list[torch.Tensor]] = {}
    real_sample = model_runner.sample

    def execute_spy(self, plan):
        sampling = [c.seq.request_id for c in plan.chunks if c.sample]

        def capture(logits, rows):
            for rid, row in zip(sampling, logits, strict=True):
                seen.setdefault(rid, []).append(row.detach().clone())
            return real_sample(logits, rows)

        monkeypatch.setattr(model_runner, "sample", capture)
        try:
            return real_execute(self, plan)
        finally:
            monkeypatch.setattr(model_runner, "sample", real_sample)

    real_execute = model_runner.ModelRunner.execute
    monkeypatch.setattr(model_runner.ModelRunner, "execute", execute_spy)
    return seen
