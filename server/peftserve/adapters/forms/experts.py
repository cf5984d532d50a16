"""Low rank on stacked expert weights: dW_e = B_e @ A_e for every expert e (LoRA via target_parameters).

Unlike the other forms this one cannot add to a layer's output: the delta acts inside the expert's
activation. MultiAdapterExperts (adapters/experts.py) recomputes the rows that carry such deltas with
experts_grouped; each stacked parameter's slots are held by an ExpertStackForm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..batch import AdapterBatch
from .base import Delta, Form, LayerSpec

WeightedDeltas = dict[str, list[tuple["ExpertLowRankDelta", float]]]
"""parameter name -> the (delta, mixture weight) pairs one sequence applies to it."""


class ExpertStackForm(Form):
    """The slots of one stacked expert parameter ('<experts>.<param>'); computed by its experts module."""

    name = "expert_low_rank"

    def __init__(self, spec: LayerSpec, stack: str, num_experts: int) -> None:
        super().__init__(spec)
        self.stack = stack
        """The parameter's name in its experts module (gate_up_proj, up_proj or down_proj)."""
        self.num_experts = num_experts
        self.out_features, self.in_features = spec.out_features, spec.in_features

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        raise NotImplementedError("expert deltas act inside the experts' activation: MultiAdapterExperts")


@dataclass(frozen=True)
class ExpertLowRankDelta(Delta):
    """A low-rank update of every expert of one stacked parameter, scaling folded into b, in (out, in)
    orientation whatever the layout of the stack."""

    form: ClassVar[type[Form]] = ExpertStackForm

    a: torch.Tensor
    """[E, r, in]"""
    b: torch.Tensor
    """[E, out, r]"""

    @property
    def rank(self) -> int:
        return self.a.shape[1]

    @property
    def num_experts(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of each expert's projection."""
        return self.b.shape[1], self.a.shape[2]

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if self.shape != shape:
            return f"lora_B/lora_A give each expert's shape (out, in) = {self.shape}, the base has {shape}"
        return None

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return self.rank

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        if self.rank > max_rank:
            return f"rank {self.rank} exceeds the server's max rank {max_rank}"
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [("lora_A", self.a), ("lora_B x scaling", self.b)]


def _project(
    experts: nn.Module, name: str, expert: int, x: torch.Tensor, deltas: WeightedDeltas
) -> torch.Tensor:
    """x [n, in] through expert `expert`'s `name` projection (bias included) plus its deltas: [n, out]."""
    weight = getattr(experts, name)[expert]  # [out, in], or [in, out] when the stack is transposed
    y = x @ weight if experts.is_transposed else F.linear(x, weight)
    if experts.has_bias:
        y = y + getattr(experts, f"{name}_bias")[expert]
    for delta, w in deltas.get(name, ()):
        y = y + w * ((x @ delta.a[expert].T) @ delta.b[expert].T)
    return y


def experts_reference(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    deltas: WeightedDeltas,
) -> torch.Tensor:
    """Reference semantics of an experts module whose weights carry LoRA deltas, for one sequence's rows.

    Semantics: for row t and each of its top-k experts e with routing weight g,
        up = x_t @ (W_up[e] + sum_s w_s * B_s[e] @ A_s[e])ᵀ (+ bias)
        h  = gate(up)  (the module's own _apply_gate, or its activation without a gate)
        out[t] += g * (h @ (W_down[e] + sum_s w_s * B'_s[e] @ A'_s[e])ᵀ (+ bias))
    i.e. what the module computes with every expert weight merged with the mixture of deltas (peft's
    forward), without materializing a merged stack. hidden: [n, H]; top_k_*: [n, k]. Returns [n, H].
    """
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    out = torch.zeros_like(hidden)  # [n, H]
    for expert in top_k_index.unique().tolist():
        if expert >= experts.num_experts:  # an expert-parallel sentinel: not this rank's
            continue
        rows, k_pos = (top_k_index == expert).nonzero(as_tuple=True)
        up = _project(experts, up_name, expert, hidden[rows], deltas)
        h = experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)
        down = _project(experts, "down_proj", expert, h, deltas)
        if getattr(experts, "has_post_expert_norm", False):
            down = experts.post_expert_norm(down)
        out.index_add_(0, rows, (down * top_k_weights[rows, k_pos, None]).to(out.dtype))
    return out


@dataclass(frozen=True)
class Term:
    """One slot's delta on one stacked parameter, and which of the recomputed rows apply it."""

    delta: ExpertLowRankDelta
    rows: torch.Tensor
    """[m] bool over the recomputed rows."""
    weight: torch.Tensor
    """[m, 1] the mixture weight of those rows (0 elsewhere)."""


def _project_grouped(
    experts: nn.Module,
    name: str,
    expert: int,
    x: torch.Tensor,
    rows: torch.Tensor,
    terms: dict[str, list[Term]],
) -> torch.Tensor:
    """x [n, in] (recomputed rows `rows` routed to `expert`) through its projection, each row's deltas
    added: [n, out]."""
    y = _project(experts, name, expert, x, {})
    for term in terms.get(name, ()):
        sel = term.rows[rows].nonzero()[:, 0]  # [n_s] positions in x of the rows using this slot
        if sel.numel() == 0:
            continue
        xs = x.index_select(0, sel)
        low_rank = (xs @ term.delta.a[expert].T) @ term.delta.b[expert].T  # [n_s, out]
        y.index_add_(0, sel, low_rank * term.weight[rows].index_select(0, sel))
    return y


def experts_grouped(
    experts: nn.Module,
    hidden: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    terms: dict[str, list[Term]],
) -> torch.Tensor:
    """Fast path of experts_reference for the rows of many sequences at once.

    Semantics: row t's output is experts_reference(t) with the deltas of the terms whose rows hold t,
    each at its weight[t]. One base matmul per expert for all rows (each expert's weight is read once,
    not once per sequence), then one low-rank pair per (slot, expert) over the rows that use the slot.
    hidden: [m, H] (the recomputed rows only); top_k_*: [m, k]; terms: parameter name -> its slots' terms.
    Returns [m, H].
    """
    up_name = "gate_up_proj" if experts.has_gate else "up_proj"
    out = torch.zeros_like(hidden)  # [m, H]
    for expert in top_k_index.unique().tolist():
        if expert >= experts.num_experts:
            continue
        rows, k_pos = (top_k_index == expert).nonzero(as_tuple=True)
        up = _project_grouped(experts, up_name, expert, hidden[rows], rows, terms)
        h = experts._apply_gate(up) if experts.has_gate else experts.act_fn(up)
        down = _project_grouped(experts, "down_proj", expert, h, rows, terms)
        if getattr(experts, "has_post_expert_norm", False):
            down = experts.post_expert_norm(down)
        out.index_add_(0, rows, (down * top_k_weights[rows, k_pos, None]).to(out.dtype))
    return out
