"""The tiny test models: each family reloads offline with matching tokenizer and EOS."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.helpers.tiny_models import build_tiny_model


def test_saved_family_reloads_with_same_logits(tiny_family_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_family_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_family_dir, local_files_only=True)
    config = model.config
    assert len(tokenizer) == config.vocab_size
    assert tokenizer.eos_token == "</s>" and tokenizer.eos_token_id == config.eos_token_id
    assert model.generation_config.eos_token_id == config.eos_token_id
    if config.model_type != "gpt2":
        assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    fresh, _ = build_tiny_model(config.model_type)
    ids = torch.tensor([tokenizer.encode("hello tiny model")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, fresh(ids).logits, rtol=0, atol=0)


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    a, _ = build_tiny_model("llama", seed=1)
    assert torch.equal(torch.rand(3), expected)
    b, _ = build_tiny_model("llama", seed=1)
    c, _ = build_tiny_model("llama", seed=2)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert not a.training and wa.dtype == torch.float32
