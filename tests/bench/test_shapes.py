"""Benchmark shapes: parameter counts agree with the models built from them and with Llama-2-7B's."""

from peftserve.bench.models import build_model
from peftserve.bench.shapes import BENCH_SHAPES, LLAMA_7B, TINY


def test_block_params_count_the_built_model_without_embeddings_and_head():
    model = build_model(TINY)
    total = sum(p.numel() for p in model.parameters())
    assert TINY.block_params == total - 2 * TINY.vocab * TINY.hidden


def test_llama_7b_is_llama_2_7b():
    assert LLAMA_7B.block_params + 2 * LLAMA_7B.vocab * LLAMA_7B.hidden == 6_738_415_616
    assert 4 * LLAMA_7B.lora_params(16, ("q_proj", "v_proj")) == 33_554_432
    assert BENCH_SHAPES["llama-7b"] is LLAMA_7B
