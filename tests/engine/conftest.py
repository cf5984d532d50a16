"""Engine test helpers: tiny models, reference generation, request builders, runs that keep logits."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import FinishReason, GenerationRequest, SamplingParams
from tests.helpers.tiny_models import build_tiny_model


@dataclass
class Recorded:
    """What a request produced in an engine run, with the logits of each of its sampled tokens."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: FinishReason | None = None
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def logits(self) -> torch.Tensor:
        return torch.stack(self.rows)  # [tokens, V]


def run_recording(
    engine: LLMEngine, waves: list[list[GenerationRequest]], every: int = 3
) -> dict[str, Recorded]:
    """Add wave i after i * `every` steps and run everything to the end, keeping each step's logits
    as the engine hands them back (step_with_output): nothing inside the runner is patched."""
    recorded = {r.request_id: Recorded() for wave in waves for r in wave}
    steps = 0
    while engine.has_unfinished() or steps <= every * (len(waves) - 1):
        if steps % every == 0 and steps // every < len(waves):
            for r in waves[steps // every]:
                engine.add_request(r)
        outputs, step, output = engine.step_with_output()
        for rid, row in (output.logits_of(step) if output is not None else {}).items():
            recorded[rid].rows.append(row.clone())
        for out in outputs:
            rec = recorded[out.request_id]
            rec.token_ids += out.token_ids
            rec.text += out.text
            rec.finish_reason = out.finish_reason
        steps += 1
    return recorded


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
