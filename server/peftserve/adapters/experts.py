"""Mixture-of-experts modules with per-slot LoRA: the experts' stacked weights and the router's weight.

transformers 5 stores a layer's experts as stacked parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I], transposed for some families) behind its experts interface, and routes with a small module
holding a [E, H] weight. peft adapts both through target_parameters (lora/parameters.py). A LoRA on an
expert acts inside the expert's activation, so it cannot be added to the layer's output: the rows of
sequences whose adapter touches the experts are recomputed here, expert by expert, with their deltas,
after the base module ran once for all rows. Rows without such an adapter keep the base output untouched,
bit for bit. Every computation is per row (routing has no capacity limit and no batch statistic), so a
row never reads another row's values; only the rounding of an expert's matmul may depend on how many
rows share that expert in the step, as any matmul's may on its batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .batch import AdapterBatch, AdapterContext
from .lora.parameters import EXPERT_PARAMETERS
from .normalized import ExpertLoraDelta, LoraDelta

WeightedDeltas = dict[str, list[tuple[ExpertLoraDelta, float]]]
"""parameter name -> the (delta, mixture weight) pairs one sequence applies to it."""


def is_experts_module(module: nn.Module) -> bool:
    """True for an experts module of transformers' experts interface (stacked [E, ., .] weights)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    stacked = all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (up, down))
    return stacked and all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed"))


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

    delta: ExpertLoraDelta
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


class ExpertParameter:
    """The slots of one stacked expert parameter (what DeviceSlots loads by '<experts>.<param>')."""

    def __init__(self, owner: MultiAdapterExperts, name: str) -> None:
        stack = getattr(owner.base_layer, name)  # [E, out, in], or [E, in, out] transposed
        self.owner = owner
        self.name = name
        self.num_experts = stack.shape[0]
        inner = stack.shape[1:]
        self.out_features, self.in_features = inner[::-1] if owner.base_layer.is_transposed else inner
        self.slots: list[ExpertLoraDelta | None] = [None] * owner.num_slots

    def load(self, slot: int, delta: ExpertLoraDelta) -> None:
        self.slots[slot] = delta
        self.owner.loaded.add(slot)

    def clear(self, slot: int) -> None:
        self.slots[slot] = None
        owner = self.owner
        if all(p.slots[slot] is None for p in owner.stacks.values()):
            owner.loaded.discard(slot)


class MultiAdapterExperts(nn.Module):
    """Runs the untouched experts module once for all rows, then recomputes the rows of sequences whose
    adapters carry expert deltas (experts_grouped) and writes them over the base output."""

    def __init__(self, base_layer: nn.Module, context: AdapterContext, num_slots: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.num_slots = num_slots
        self.loaded: set[int] = set()
        names = [n for n in EXPERT_PARAMETERS if isinstance(getattr(base_layer, n, None), nn.Parameter)]
        self.stacks = {name: ExpertParameter(self, name) for name in names}

    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    def _terms(self, batch: AdapterBatch, device: torch.device) -> tuple[torch.Tensor, dict[str, list[Term]]]:
        """The rows to recompute ([m] indices of the step's tokens) and each (parameter, slot)'s term."""
        spans = [
            (start, length, pairs)
            for start, length, pairs in batch.spans
            if any(slot in self.loaded for slot, _ in pairs)
        ]
        m = sum(length for _, length, _ in spans)
        index = torch.cat([torch.arange(start, start + length) for start, length, _ in spans]).to(device)
        parts: dict[tuple[str, int], Term] = {}
        offset = 0
        for _, length, pairs in spans:
            for slot, weight in pairs:
                for name, stack in self.stacks.items():
                    delta = stack.slots[slot]
                    if delta is None:
                        continue
                    term = parts.get((name, slot))
                    if term is None:
                        rows = torch.zeros(m, dtype=torch.bool, device=device)
                        term = Term(delta, rows, torch.zeros(m, 1, dtype=delta.a.dtype, device=device))
                        parts[(name, slot)] = term
                    term.rows[offset : offset + length] = True
                    term.weight[offset : offset + length] = weight
            offset += length
        terms: dict[str, list[Term]] = {}
        for (name, _), term in parts.items():
            terms.setdefault(name, []).append(term)
        return index, terms

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        # hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]
        batch: AdapterBatch | None = self.context.batch
        if batch is None or self.loaded.isdisjoint(batch.slots):
            return self.base_layer(hidden_states, top_k_index, top_k_weights)  # [T, H]
        if hidden_states.shape[0] != batch.num_tokens:
            got = hidden_states.shape[0]
            raise RuntimeError(f"adapter batch is for {batch.num_tokens} tokens, experts got {got}")
        index, terms = self._terms(batch, hidden_states.device)  # [m]
        if index.numel() == hidden_states.shape[0]:  # no base row: the base output would be overwritten
            out = torch.empty_like(hidden_states)
        else:
            out = self.base_layer(hidden_states, top_k_index, top_k_weights)  # [T, H]
        redone = experts_grouped(
            self.base_layer,
            hidden_states.index_select(0, index),
            top_k_index.index_select(0, index),
            top_k_weights.index_select(0, index),
            terms,
        )  # [m, H]
        return out.index_copy_(0, index, redone)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, params=[{', '.join(self.stacks)}], slots={self.num_slots}"


class MultiAdapterRouter(nn.Module):
    """A router (its [E, H] weight adapted by LoRA through target_parameters), per sequence.

    The router's own forward runs once for all rows; for each sequence with a router delta it runs again
    on that sequence's rows with the merged weight W + sum_s w_s * B_s @ A_s, as peft's forward does, and
    those rows of every output (logits, routing weights, expert indices) are replaced.
    """

    def __init__(self, base_layer: nn.Module, context: AdapterContext, num_slots: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.out_features, self.in_features = base_layer.weight.shape
        self.slots: list[LoraDelta | None] = [None] * num_slots
        self.loaded: set[int] = set()

    def load(self, slot: int, delta: LoraDelta) -> None:
        self.slots[slot] = delta
        self.loaded.add(slot)

    def clear(self, slot: int) -> None:
        self.slots[slot] = None
        self.loaded.discard(slot)

    def forward(self, hidden_states: torch.Tensor):
        outputs = self.base_layer(hidden_states)  # each [T, ...]
        batch: AdapterBatch | None = self.context.batch
        if batch is None or self.loaded.isdisjoint(batch.slots):
            return outputs
        hidden = hidden_states.reshape(-1, self.in_features)  # [T, H]
        for start, length, pairs in batch.spans:
            active = [(self.slots[s], w) for s, w in pairs if self.slots[s] is not None]
            if not active:
                continue
            weight = self.base_layer.weight + sum(w * (d.b @ d.a) for d, w in active)  # [E, H]
            rows = slice(start, start + length)
            redone = functional_call(self.base_layer, {"weight": weight}, (hidden[rows],))
            for full, part in zip(outputs, redone, strict=True):
                full[rows] = part
        return outputs

    def extra_repr(self) -> str:
        return f"experts={self.out_features}, in={self.in_features}, slots={len(self.slots)}"


def wrap_experts(
    model: nn.Module, context: AdapterContext, num_slots: int
) -> dict[str, ExpertParameter | MultiAdapterRouter]:
    """Wrap every experts module and its router, once, at start.

    Returns what DeviceSlots loads deltas into: '<experts>.<param>' for each stacked parameter, and the
    router's module path. A router is the experts module's sibling holding a [num_experts, H] weight.
    """
    found = [(path, m) for path, m in model.named_modules() if is_experts_module(m)]
    targets: dict[str, ExpertParameter | MultiAdapterRouter] = {}
    for path, module in found:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        wrapper = MultiAdapterExperts(module, context, num_slots)
        setattr(parent, name, wrapper)
        for param_name, param in wrapper.stacks.items():
            targets[f"{path}.{param_name}"] = param
        for child_name, child in list(parent.named_children()):
            weight = getattr(child, "weight", None)
            is_router = (
                child_name != name
                and not isinstance(child, nn.Linear)
                and isinstance(weight, nn.Parameter)
                and weight.dim() == 2
                and weight.shape[0] == module.num_experts
            )
            if is_router:
                router = MultiAdapterRouter(child, context, num_slots)
                setattr(parent, child_name, router)
                targets[f"{parent_path}.{child_name}"] = router
    return targets
