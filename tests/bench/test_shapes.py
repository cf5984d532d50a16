"""Benchmark shapes: parameter counts agree with the models built from them and with Llama-2-7B's."""

import dataclasses

import pytest

from peftserve.bench.models import build_model
from peftserve.bench.shapes import BENCH_SHAPES, FAMILY_SHAPES, LLAMA_7B, TINY


def test_block_params_count_the_built_model_without_embeddings_and_head():
    model = build_model(TINY)
    total = sum(p.numel() for p in model.parameters())
    assert TINY.block_params == total - 2 * TINY.vocab * TINY.hidden


def test_llama_7b_is_llama_2_7b():
    assert LLAMA_7B.block_params + 2 * LLAMA_7B.vocab * LLAMA_7B.hidden == 6_738_415_616
    assert 4 * LLAMA_7B.lora_params(16, ("q_proj", "v_proj")) == 33_554_432
    assert BENCH_SHAPES["llama-7b"] is LLAMA_7B


@pytest.mark.parametrize("name", FAMILY_SHAPES)
def test_family_shapes_count_their_built_models(name):
    """A tiny model of each family shape: block_params is every parameter but the embeddings and head;
    active_block_params holds experts_per_token experts a layer."""
    shape = FAMILY_SHAPES[name]
    tiny = dataclasses.replace(shape, hidden=64, intermediate=96, explicit_head_dim=24, vocab=1024, layers=2)
    model = build_model(tiny)
    assert model.config.model_type == shape.family
    embeddings = {id(p): p.numel() for p in (model.get_input_embeddings().weight, model.lm_head.weight)}
    assert tiny.block_params == sum(p.numel() for p in model.parameters()) - sum(embeddings.values())
    expert = 3 * tiny.hidden * tiny.intermediate
    assert tiny.block_params - tiny.active_block_params == tiny.layers * expert * (
        tiny.experts - tiny.experts_per_token
    )
