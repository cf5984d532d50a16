"""The fidelity invariant through the whole engine (DESIGN.md §4).

In one continuously batched run mixing every served kind - LoRA (rank/alpha patterns, rslora), LoRA
on some layers, AdaLoRA (pruned), DoRA, IA³, LoHa, LoKr, VeRA, SHiRA (sparse), prefix tuning (with
and without projection) - weighted mixtures across kinds and base-only requests, with different
prompt lengths and requests joining mid-flight, every request's logits equal PEFT's own forward for
its adapter alone (a mixture: the model peft merges from them) within 1e-4 in fp32 and its 32 greedy
tokens are identical; base-only rows equal the base model. The engine hands back each step's logits
(step_with_output), so nothing inside the runner is patched to see them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from peftserve.adapters.forms import low_rank_rows
from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts, run_recording
from tests.helpers.tiny_models import FAMILIES, build_tiny_model

NEW_TOKENS = 32
TOL = 1e-4


def requests_for(
    uses, vocab_size: int, new_tokens: int, lengths: list[int] | None = None
) -> list[GenerationRequest]:
    """One greedy request per entry of uses (its adapter refs; () for the base), with seeded prompts of
    `lengths` tokens (by default 3-31)."""
    lengths = lengths or [3 + 5 * i % 29 for i in range(len(uses))]
    prompts = random_prompts(lengths, vocab_size, seed=7)
    return [
        GenerationRequest(
            request_id=f"{i}-" + ("+".join(n for n, _ in refs) or "base"),
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
            adapters=tuple(AdapterRef(n, w) for n, w in refs),
        )
        for i, (refs, prompt) in enumerate(zip(uses, prompts, strict=True))
    ]


def make_adapters(base, family: str, root) -> dict[str, object]:
    adapters = pf.make_all(base, family, root)
    adapters["prefix"] = pf.make_prefix(base, root / "prefix", projection=False)
    adapters["prefix-proj"] = pf.make_prefix(base, root / "prefix-proj", projection=True)
    return adapters


def reference_model(base, adapters: dict[str, object], refs) -> torch.nn.Module:
    """What a request on `refs` must equal: the base model, PEFT's model of its adapter, or the model
    peft merges from a mixture."""
    if not refs:
        return base
    if len(refs) == 1:
        return PeftModel.from_pretrained(copy.deepcopy(base), adapters[refs[0][0]]).eval()
    return pf.merged_mixture(base, [(adapters[n], w) for n, w in refs])


def reference_run(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding and each step's logits: incremental with the model's own cache, except prefix
    tuning, recomputed in full (PEFT's generate drops prefixes on transformers 5.24, its forward not)."""
    config = getattr(model, "active_peft_config", None)
    if config is not None and config.is_prompt_learning:
        ids, rows = list(prompt), []
        with torch.no_grad():
            for _ in range(n):
                logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
                rows.append(logits)
                ids.append(int(logits.argmax()))
        return ids[len(prompt) :], torch.stack(rows)
    tokens, rows = [], []
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            logits = out.logits[0, -1]
            rows.append(logits)
            tokens.append(int(logits.argmax()))
            out = model(input_ids=torch.tensor([tokens[-1:]]), cache=out.past_key_values, use_cache=True)
    return tokens, torch.stack(rows)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_adapter_batch_equals_peft_per_adapter(family, tmp_path):
    base, _ = build_tiny_model(family)
    adapters = make_adapters(base, family, tmp_path)

    model, tokenizer = build_tiny_model(family)
    manager = AdapterManager(model, num_slots=len(adapters), device="cpu", dtype=torch.float32)
    for adapter_id, path in adapters.items():
        manager.register(adapter_id, path)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=4, block_size=4, max_batched_tokens=64), adapters=manager
    )

    mixtures = [m for m in pf.MIXTURES if all(n in adapters for n, _ in m)]
    uses = [((name, 1.0),) for name in adapters] + [()] + mixtures + [()]
    uses = uses[::2] + uses[1::2]  # every kind in each half, so the second half joins a mixed batch
    requests = requests_for(uses, engine.model_info.vocab_size, NEW_TOKENS)
    half = len(requests) // 2
    recorded = run_recording(engine, [requests[:half], requests[half:]])

    for refs, request in zip(uses, requests, strict=True):
        reference = reference_model(base, adapters, refs)
        want_tokens, want_logits = reference_run(reference, request.prompt_token_ids, NEW_TOKENS)
        assert recorded[request.request_id].token_ids == want_tokens, request.request_id
        got = recorded[request.request_id].logits
        if not refs:
            assert torch.allclose(got, want_logits, atol=1e-5, rtol=0), request.request_id
        else:
            err = (got - want_logits).abs().max().item()
            assert err <= TOL, f"{family}/{request.request_id}: max |Δlogit| {err:.2e}"


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


def test_long_prompts_through_the_rows_kernel_equal_peft(tmp_path, monkeypatch):
    """Prompts of 40, 100 and 300 tokens on LoRA adapters in one prefill step: the CPU kernel runs the
    first two as rows (up to ROWS_SPAN_MAX) and the third as a GEMM of 256 tokens plus 44 rows; every
    step's logits equal PEFT's own forward within 1e-4 in fp32 and the greedy tokens are identical."""
    base, _ = build_tiny_model("llama")
    paths = {
        "patterns": pf.make_lora_patterns(base, "llama", tmp_path / "patterns"),
        "layers": pf.make_lora_layers(base, "llama", tmp_path / "layers"),
    }
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=2, device="cpu", dtype=torch.float32)
    assert manager.kernels == "compiled"
    low_rank_rows.warm_up(torch.float32)
    assert low_rank_rows.usable(torch.float32), low_rank_rows.unavailable
    rows_per_call: list[int] = []
    add_rows = low_rank_rows.add_rows

    def counting(y, x, parts, stacks):
        rows_per_call.append(sum(len(part.rows) for part in parts))
        add_rows(y, x, parts, stacks)

    monkeypatch.setattr(low_rank_rows, "add_rows", counting)
    for adapter_id, path in paths.items():
        manager.register(adapter_id, path)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=4, block_size=4, max_batched_tokens=512), adapters=manager
    )
    uses = [(("patterns", 1.0),), (("layers", 1.0),), (("patterns", 1.0),)]
    requests = requests_for(uses, engine.model_info.vocab_size, 8, lengths=[100, 300, 40])
    recorded = run_recording(engine, [requests])
    assert max(rows_per_call) >= 100 + 44 + 40  # the prefill step's rows went through the kernel
    for refs, request in zip(uses, requests, strict=True):
        want_tokens, want_logits = reference_run(
            reference_model(base, paths, refs), request.prompt_token_ids, 8
        )
        assert recorded[request.request_id].token_ids == want_tokens, request.request_id
        err = (recorded[request.request_id].logits - want_logits).abs().max().item()
        assert err <= TOL, f"{request.request_id}: max |Δlogit| {err:.2e}"
