"""Greedy output of the engine equals transformers' own generate, token for token."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from tests.engine.conftest import random_prompts, reference_greedy, request
from tests.helpers.tiny_models import FAMILIES, tiny_tokenizer

NEW_TOKENS = 16


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_with_late_joiners_matches_generate(make_engine, family):
    # max_batched_tokens=24 forces chunked prefill of the longer prompts.
    engine, reference, _ = make_engine(family, max_batched_tokens=24)
    prompts = random_prompts([5, 17, 40, 1, 33, 9], engine.model_info.vocab_size)
    expected = [reference_greedy(reference, p, NEW_TOKENS) for p in prompts]

    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i in range(3):
        engine.add_request(request(str(i), prompts[i], max_new_tokens=NEW_TOKENS))
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if steps in (4, 9, 10):  # join while the others are decoding
            i = {4: 3, 9: 4, 10: 5}[steps]
            engine.add_request(request(str(i), prompts[i], max_new_tokens=NEW_TOKENS))
        for out in engine.step():
            got[out.request_id] += out.token_ids
    for i, want in enumerate(expected):
        assert got[str(i)] == want, f"request {i} (prompt length {len(prompts[i])})"


def test_sliding_window_matches_generate():
    tokenizer = tiny_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=8,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    reference = MistralForCausalLM(copy.deepcopy(config)).eval()
    reference.load_state_dict(model.state_dict())
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=1, block_size=4, max_batched_tokens=16)
    )
    prompts = random_prompts([5, 30], engine.model_info.vocab_size, seed=3)
    done = engine.generate_all([request(str(i), p, max_new_tokens=12) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert done[str(i)].token_ids == reference_greedy(reference, p, 12)
