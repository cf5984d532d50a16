"""Fidelity in bfloat16: the engine (packed bf16 linears, bf16 KV cache and adapter deltas) against PEFT's
own forward in bfloat16, every served kind in one continuously batched run.

bfloat16 keeps 8 bits of mantissa, so two correct implementations that round in different places
differ by a few units of the last place per layer: exact equality is not the invariant here. What is:
each step's logits within LOGIT_TOL of PEFT's on the same context (teacher-forced on the engine's own
tokens, so one early near-tie does not decide everything after it), and the engine's greedy token
equal to PEFT's argmax on at least MIN_AGREEMENT of the steps. For scale, the same share for PEFT in
bf16 against PEFT in float32 is printed beside it (pytest -s; recorded in benchmarks/README.md).
float32 stays exact: test_adapter_fidelity.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel

from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.runner.linear import PackedLinear, onednn_usable
from tests.engine.conftest import run_recording
from tests.engine.test_adapter_fidelity import make_adapters, requests_for
from tests.helpers.tiny_models import FAMILIES, build_tiny_model

NEW_TOKENS = 16
LOGIT_TOL = 0.15
"""Largest |Δlogit| allowed against PEFT in bf16 (seed 0: at most 0.086 measured; the tiny models' logits span
about ±4, where a bf16 unit of the last place is 1/64 to 1/32)."""
MIN_AGREEMENT = 0.9
"""Smallest share of steps whose greedy token equals PEFT's argmax on the same context."""


def peft_logits(reference, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """PEFT's logits [n, V] (float32) at each generated position, on the prompt plus the engine's tokens."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        return reference(input_ids=ids).logits[0, len(prompt) - 1 :].float()


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_engine_agrees_with_peft_in_bf16(family, tmp_path):
    torch.manual_seed(0)  # the adapters' random weights, whatever ran before (the bound is measured on these)
    base32, _ = build_tiny_model(family)
    adapters = make_adapters(base32, family, tmp_path)
    base = copy.deepcopy(base32).to(torch.bfloat16)

    model, tokenizer = build_tiny_model(family)
    model.to(torch.bfloat16)
    manager = AdapterManager(model, num_slots=len(adapters), device="cpu", dtype=torch.bfloat16)
    for adapter_id, path in adapters.items():
        manager.register(adapter_id, path)
    config = EngineConfig(kv_cache_mb=4, block_size=4, max_batched_tokens=64)
    engine = LLMEngine.from_model(model, tokenizer, config, adapters=manager)
    assert engine.model_info.dtype == "bfloat16"
    assert engine.runner.cache.keys.dtype == torch.bfloat16
    packed = any(isinstance(m, PackedLinear) for m in model.modules())
    assert packed == (onednn_usable(torch.bfloat16) and family != "gpt2")  # GPT-2: Conv1D, not Linear

    uses = [((name, 1.0),) for name in adapters] + [()]
    requests = requests_for(uses, engine.model_info.vocab_size, NEW_TOKENS)
    half = len(requests) // 2
    recorded = run_recording(engine, [requests[:half], requests[half:]])

    agree = agree32 = steps = 0
    worst = 0.0
    for refs, request in zip(uses, requests, strict=True):
        references = [base, base32]
        if refs:
            references = [
                PeftModel.from_pretrained(copy.deepcopy(b), adapters[refs[0][0]]).eval() for b in references
            ]
        got = recorded[request.request_id]
        want, want32 = (peft_logits(r, request.prompt_token_ids, got.token_ids) for r in references)  # [n, V]
        err = (got.logits.float() - want).abs().max().item()
        assert err <= LOGIT_TOL, f"{family}/{request.request_id}: max |Δlogit| {err:.3f} vs PEFT in bf16"
        worst = max(worst, err)
        agree += sum(int(t == w) for t, w in zip(got.token_ids, want.argmax(-1).tolist(), strict=True))
        agree32 += int((want.argmax(-1) == want32.argmax(-1)).sum())
        steps += len(got.token_ids)
    print(
        f"\n{family}: greedy agreement with PEFT bf16 {agree}/{steps} = {agree / steps:.1%}, max |Δlogit| "
        f"{worst:.3f}; PEFT bf16 with PEFT float32 {agree32 / steps:.1%}"
    )
    assert agree / steps >= MIN_AGREEMENT
