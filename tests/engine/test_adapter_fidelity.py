"""The fidelity invariant through the whole engine (DESIGN.md §4).

In one continuously batched run mixing LoRA (rank/alpha patterns, rslora), LoRA on some layers,
AdaLoRA (pruned), SHiRA (sparse), prefix tuning (with and without projection) and base-only
requests, with different prompt lengths and requests joining mid-flight, every request's logits
equal PEFT's own forward for its adapter alone (fp32, 1e-4) and its 32 greedy tokens are identical;
base-only rows equal the base model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts, reference_run
from tests.helpers.tiny_models import FAMILIES, build_tiny_model

NEW_TOKENS = 32
TOL = 1e-4


def make_adapters(base, family: str, root) -> dict[str, object]:
    adapters = {
        "lora-patterns": pf.make_lora_patterns(base, family, root / "lora-patterns"),
        "lora-layers": pf.make_lora_layers(base, family, root / "lora-layers"),
        "adalora": pf.make_adalora(base, family, root / "adalora"),
        "prefix": pf.make_prefix(base, root / "prefix", projection=False),
        "prefix-proj": pf.make_prefix(base, root / "prefix-proj", projection=True),
    }
    if family != "gpt2":  # peft's SHiRA wraps nn.Linear only, not GPT-2's Conv1D
        adapters["shira"] = pf.make_shira(base, family, root / "shira")
    return adapters


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_batch_equals_peft_per_adapter(family, tmp_path, record_logits):
    base, _ = build_tiny_model(family)
    adapters = make_adapters(base, family, tmp_path)

    model, tokenizer = build_tiny_model(family)
    manager = AdapterManager(model, num_slots=8, device="cpu", dtype=torch.float32)
    for adapter_id, path in adapters.items():
        manager.register(adapter_id, path)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=2, block_size=4, max_batched_tokens=48), adapters=manager
    )

    names = [*adapters, None, *adapters, None]  # every adapter twice, base-only twice
    prompts = random_prompts(
        [3 + 5 * i % 29 for i in range(len(names))], engine.model_info.vocab_size, seed=7
    )
    requests = [
        GenerationRequest(
            request_id=f"{i}-{name or 'base'}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
            adapters=(AdapterRef(name),) if name else (),
        )
        for i, (name, prompt) in enumerate(zip(names, prompts, strict=True))
    ]
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    half = len(requests) // 2
    for r in requests[:half]:
        engine.add_request(r)
    steps = 0
    while engine.has_unfinished() or steps < 3:
        if steps == 3:  # the second half joins while the first decodes
            for r in requests[half:]:
                engine.add_request(r)
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        steps += 1

    references = {None: base}
    for name, path in adapters.items():
        references[name] = PeftModel.from_pretrained(copy.deepcopy(base), path).eval()
    for name, request in zip(names, requests, strict=True):
        want_tokens, want_logits = reference_run(references[name], request.prompt_token_ids, NEW_TOKENS)
        got_logits = torch.stack(record_logits[request.request_id])
        assert tokens[request.request_id] == want_tokens, request.request_id
        if name is None:
            assert torch.allclose(got_logits, want_logits, atol=1e-5, rtol=0), request.request_id
        else:
            err = (got_logits - want_logits).abs().max().item()
            assert err <= TOL, f"{request.request_id}: max |Δlogit| {err:.2e}"


def test_weighted_mixture_equals_merged_model(tmp_path):
    base, _ = build_tiny_model("llama")
    a = pf.make_lora_patterns(base, "llama", tmp_path / "a")
    b = pf.make_lora_layers(base, "llama", tmp_path / "b")
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=4, device="cpu", dtype=torch.float32)
    manager.register("a", a)
    manager.register("b", b)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=1, block_size=4), adapters=manager
    )
    prompt = random_prompts([11], engine.model_info.vocab_size, seed=2)[0]
    mix = (AdapterRef("a", 0.7), AdapterRef("b", -1.3))
    done = engine.generate_all(
        [
            GenerationRequest(
                "m",
                prompt_token_ids=prompt,
                sampling=SamplingParams(max_new_tokens=16, ignore_eos=True),
                adapters=mix,
            )
        ]
    )
    merged = pf.merged_mixture(base, [(a, 0.7), (b, -1.3)])
    want, _ = reference_run(merged, prompt, 16)
    assert done["m"].token_ids == want


def test_unknown_adapter_is_not_found_and_prefix_counts_against_the_context(tmp_path):
    from peftserve.errors import AdapterNotFound, InvalidRequest

    base, _ = build_tiny_model("llama")
    prefix = pf.make_prefix(base, tmp_path / "p", projection=False)  # 5 virtual tokens
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=2, device="cpu", dtype=torch.float32)
    manager.register("p", prefix)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=1, block_size=4), adapters=manager
    )
    with pytest.raises(AdapterNotFound, match="nope"):
        engine.add_request(GenerationRequest("x", prompt_token_ids=[5], adapters=(AdapterRef("nope"),)))
    ctx = engine.model_info.max_context
    fits = GenerationRequest(
        "y",
        prompt_token_ids=[5] * (ctx - 5 - 4),
        sampling=SamplingParams(max_new_tokens=4),
        adapters=(AdapterRef("p"),),
    )
    engine.prepare(fits)
    with pytest.raises(InvalidRequest, match="exceeds the context"):
        engine.prepare(
            GenerationRequest(
                "z",
                prompt_token_ids=[5] * (ctx - 5 - 4),
                sampling=SamplingParams(max_new_tokens=5),
                adapters=(AdapterRef("p"),),
            )
        )
