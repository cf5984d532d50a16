"""FISH (global top-k of Σgrad² per module) and GPS (per-row top-k of |Σgrad|) selection, and the budget."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftserve.errors import InvalidRequest
from peftserve.training.data import load_dataset
from peftserve.training.gradient_selection import (
    gradient_scores,
    rank_equivalent,
    resolve_targets,
    select_masks,
    top_entries,
    top_per_row,
)
from tests.helpers.tiny_models import build_tiny_model

from .conftest import task_records, write_jsonl


def test_fisher_keeps_the_k_highest_scores_anywhere_in_the_module():
    score = torch.tensor([[9.0, 0.0, 0.0], [8.0, 7.0, 0.0], [0.0, 0.0, 1.0]])
    assert top_entries(score, 3).tolist() == [
        [True, False, False],
        [True, True, False],
        [False, False, False],
    ]


def test_gps_gives_every_row_its_share_then_the_best_of_the_rest():
    score = torch.tensor([[9.0, 8.0, 0.0], [0.1, 0.2, 0.0], [0.0, 0.0, 1.0]])
    mask = top_per_row(score, 4)  # 4 // 3 = 1 per row, 1 more: the best remaining entry (8.0)
    assert mask.tolist() == [[True, True, False], [False, True, False], [False, False, True]]
    assert int(top_per_row(score, 7).sum()) == 7


def test_budget_is_a_rank_equivalent_or_a_fraction_of_the_entries():
    shapes = {"a": (64, 64), "b": (32, 64)}
    assert rank_equivalent(3, shapes) == 3
    entries, edges = 64 * 64 + 32 * 64, 128 + 96
    assert rank_equivalent(0.1, shapes) == round(0.1 * entries / edges)
    assert rank_equivalent(0.0001, shapes) == 1
    with pytest.raises(InvalidRequest, match=r"r=30 needs .* entries in b"):
        rank_equivalent(30, shapes)


def test_targets_are_linear_modules_without_the_head():
    model, _ = build_tiny_model("llama")
    everything = resolve_targets(model, ("all-linear",))
    assert len(everything) == 14 and "lm_head" not in everything
    assert sorted(resolve_targets(model, ("q_proj",))) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    with pytest.raises(InvalidRequest, match="no module of the model matches"):
        resolve_targets(model, ("nope",))
    with pytest.raises(InvalidRequest, match="nn.Linear weights only; model.embed_tokens is a Embedding"):
        resolve_targets(model, ("embed_tokens",))


def test_scores_are_summed_per_example_gradients_and_masks_follow_them(tmp_path):
    model, tokenizer = build_tiny_model("llama")
    model.requires_grad_(False)
    examples = load_dataset(write_jsonl(tmp_path / "d.jsonl", task_records()), tokenizer, 64).examples
    targets = resolve_targets(model, ("v_proj",))
    device = torch.device("cpu")
    fisher = gradient_scores(model, targets, examples, "fisher", 0, device)
    gps = gradient_scores(model, targets, examples, "gps", 0, device)
    # By hand for one module: Σ g_i² and |Σ g_i| over single-example backward passes.
    weight = targets["model.layers.0.self_attn.v_proj"].weight
    weight.requires_grad_(True)
    grads = []
    for example in examples:
        ids = torch.tensor([example.input_ids])
        loss = model(input_ids=ids, labels=torch.tensor([example.labels])).loss
        grads.append(torch.autograd.grad(loss, weight)[0])
    weight.requires_grad_(False)
    path = "model.layers.0.self_attn.v_proj"
    torch.testing.assert_close(fisher[path], sum(g.square() for g in grads))
    torch.testing.assert_close(gps[path], sum(grads).abs())
    assert not any(p.requires_grad for p in model.parameters())  # the base is left frozen
    masks = select_masks(model, targets, examples, "fisher", 1, 0, device)
    assert torch.equal(masks[path], top_entries(fisher[path], 32 + 64))
    assert all(int(m.sum()) == 96 for m in masks.values())


def test_sparse_tuning_refuses_non_linear_targets():
    with pytest.raises(InvalidRequest, match="nn.Linear weights only"):
        resolve_targets(nn.Sequential(nn.Conv1d(2, 2, 1)), ("0",))
    gpt2, _ = build_tiny_model("gpt2")
    with pytest.raises(InvalidRequest, match="Conv1D"):
        resolve_targets(gpt2, ("all-linear",))
