"""Gradient-based selection of the weight entries a sparse adapter trains (FISH mask and GPS).

- fisher (Sung et al., 2021): score = Σ_examples grad², the empirical Fisher diagonal with one example
  per backward pass; each module keeps its top-k entries.
- gps (Zhang et al., 2024): score = |Σ_examples grad|, the accumulated gradient; each output row
  keeps its top entries (k // out per row), and the remainder goes to the best entries left in the module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from peftserve.errors import InvalidRequest
from peftserve.training.data import Example, collate

log = logging.getLogger(__name__)


def resolve_targets(model: nn.Module, names: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Path -> Linear for every target: 'all-linear' (all but the output head), or names as path suffixes."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found: dict[str, nn.Linear] = {}
    for path, module in model.named_modules():
        if names == ("all-linear",):
            hit = isinstance(module, nn.Linear) and module is not head
        else:
            hit = any(path == n or path.endswith("." + n) for n in names)  # peft's list semantics
        if not hit:
            continue
        if not isinstance(module, nn.Linear):
            raise InvalidRequest(
                f"sparse tuning targets nn.Linear weights only; {path} is a {type(module).__name__}"
            )
        found[path] = module
    if not found and names == ("all-linear",):
        raise InvalidRequest(
            "sparse tuning needs nn.Linear layers (peft's SHiRA wraps only those), and this model has none "
            "besides its output head (GPT-2 style models use Conv1D)"
        )
    if not found:
        raise InvalidRequest(f"no module of the model matches target_modules {list(names)}")
    return found


def rank_equivalent(budget: float, shapes: dict[str, tuple[int, int]]) -> int:
    """The r whose r·(out+in) entries per module meet the budget (an integer r, or a fraction of entries)."""
    if budget >= 1:
        r = int(budget)
    else:
        entries = sum(out * inp for out, inp in shapes.values())
        edges = sum(out + inp for out, inp in shapes.values())
        r = max(1, round(budget * entries / edges))
    for path, (out, inp) in shapes.items():
        if r * (out + inp) > out * inp:
            raise InvalidRequest(
                f"sparse budget r={r} needs r·(out+in) = {r * (out + inp)} entries in {path}, "
                f"which has only {out}x{inp} = {out * inp}; lower --sparse-budget"
            )
    return r


def gradient_scores(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    examples: Sequence[Example],
    rule: str,
    pad_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-entry scores [out, in] of every target weight over `examples`, one example per backward pass."""
    weights = [module.weight for module in targets.values()]
    sums = [torch.zeros_like(w, dtype=torch.float32) for w in weights]  # [out, in] each
    was_training, needed_grad = model.training, [w.requires_grad for w in weights]
    model.eval()  # no dropout: the scores are a property of the data and the frozen base
    for w in weights:
        w.requires_grad_(True)
    try:
        for example in examples:
            batch = collate([example], pad_id, device)
            loss = model(**batch).loss
            grads = torch.autograd.grad(loss, weights)
            for total, grad in zip(sums, grads, strict=True):
                total.add_(grad.float().square() if rule == "fisher" else grad.float())
    finally:
        for w, needed in zip(weights, needed_grad, strict=True):
            w.requires_grad_(needed)
        model.train(was_training)
    if rule == "gps":
        sums = [total.abs_() for total in sums]
    return dict(zip(targets, sums, strict=True))


def top_entries(score: torch.Tensor, k: int) -> torch.Tensor:
    """fisher: bool mask [out, in] of the k highest scores."""
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    mask[score.flatten().topk(k).indices] = True
    return mask.view_as(score)


def top_per_row(score: torch.Tensor, k: int) -> torch.Tensor:
    """gps: bool mask [out, in] with the k // out best entries of each row, then the best of the rest."""
    out = score.shape[0]
    per_row = k // out
    mask = torch.zeros_like(score, dtype=torch.bool)
    if per_row:
        mask.scatter_(1, score.topk(per_row, dim=1).indices, True)
    rest = k - per_row * out
    if rest:
        remaining = score.masked_fill(mask, float("-inf")).flatten()
        mask.view(-1)[remaining.topk(rest).indices] = True
    return mask


SELECTORS = {"fisher": top_entries, "gps": top_per_row}


def select_masks(
    model: nn.Module,
    targets: dict[str, nn.Linear],
    examples: Sequence[Example],
    rule: str,
    r: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Path -> bool mask [out, in] of exactly r·(out+in) entries that `rule` picks from the gradients."""
    scores = gradient_scores(model, targets, examples, rule, pad_id, device)
    masks = {}
    for path, score in scores.items():
        out, inp = score.shape
        masks[path] = SELECTORS[rule](score, r * (out + inp))
    total = sum(int(m.sum()) for m in masks.values())
    entries = sum(m.numel() for m in masks.values())
    log.info(
        "sparse (%s): %d entries in %d modules (r=%d, %.2f%% of the target weights), scored on %d examples",
        rule,
        total,
        len(masks),
        r,
        100.0 * total / entries,
        len(examples),
    )
    return masks
