"""Mixture-of-experts modules with per-slot LoRA: the experts' stacked weights and the router's weight.

transformers 5 stores a layer's experts as stacked parameters (`gate_up_proj` [E, 2I, H], `down_proj`
[E, H, I], transposed for some families) behind its experts interface, and routes with a small module
holding a [E, H] weight. peft adapts both through target_parameters (lora/parameters.py). A LoRA on an
expert acts inside the expert's activation, so it cannot be added to the layer's output: the rows of
sequences whose adapter touches the experts are recomputed (forms/experts.py), expert by expert, with
their deltas, after the base module ran once for all rows. Rows without such an adapter keep the base
output untouched, bit for bit. Every computation is per row (routing has no capacity limit and no batch
statistic), so a row never reads another row's values; only the rounding of an expert's matmul may
depend on how many rows share that expert in the step, as any matmul's may on its batch size.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from .batch import AdapterBatch, AdapterContext
from .forms import LayerSpec, LowRankDelta, SharedTensors
from .forms.experts import ExpertStackForm, Term, experts_grouped
from .lora.parameters import EXPERT_PARAMETERS


def is_experts_module(module: nn.Module) -> bool:
    """True for an experts module of transformers' experts interface (stacked [E, ., .] weights)."""
    down = getattr(module, "down_proj", None)
    up = getattr(module, "gate_up_proj", None)
    if up is None:
        up = getattr(module, "up_proj", None)
    stacked = all(isinstance(p, nn.Parameter) and p.dim() == 3 for p in (up, down))
    return stacked and all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed"))


class MultiAdapterExperts(nn.Module):
    """Runs the untouched experts module once for all rows, then recomputes the rows of sequences whose
    adapters carry expert deltas (experts_grouped) and writes them over the base output."""

    def __init__(
        self,
        base_layer: nn.Module,
        context: AdapterContext,
        num_slots: int,
        kernels: str,
        shared: SharedTensors,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.num_slots = num_slots
        self.stacks: dict[str, ExpertStackForm] = {}
        for name in EXPERT_PARAMETERS:
            stack = getattr(base_layer, name, None)  # [E, out, in], or [E, in, out] transposed
            if not isinstance(stack, nn.Parameter):
                continue
            out_features, in_features = stack.shape[1:][::-1] if base_layer.is_transposed else stack.shape[1:]
            spec = LayerSpec(in_features, out_features, num_slots, None, kernels, shared)
            self.stacks[name] = ExpertStackForm(spec, name, stack.shape[0])

    @property
    def loaded(self) -> set[int]:
        """Slots holding a delta on any of the stacks."""
        return set().union(*(stack.loaded for stack in self.stacks.values()))

    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    def _terms(self, batch: AdapterBatch, device: torch.device) -> tuple[torch.Tensor, dict[str, list[Term]]]:
        """The rows to recompute ([m] indices of the step's tokens) and each (parameter, slot)'s term."""
        loaded = self.loaded
        spans = [
            (start, length, pairs)
            for start, length, pairs in batch.spans
            if any(slot in loaded for slot, _ in pairs)
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
        self.slots: list[LowRankDelta | None] = [None] * num_slots
        self.loaded: set[int] = set()

    def load(self, slot: int, delta: LowRankDelta) -> None:
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
    model: nn.Module, context: AdapterContext, num_slots: int, kernels: str, shared: SharedTensors
) -> dict[str, ExpertStackForm | MultiAdapterRouter]:
    """Wrap every experts module and its router, once, at start.

    Returns what DeviceSlots loads deltas into: '<experts>.<param>' for each stacked parameter, and the
    router's module path. A router is the experts module's sibling holding a [num_experts, H] weight.
    """
    found = [(path, m) for path, m in model.named_modules() if is_experts_module(m)]
    targets: dict[str, ExpertStackForm | MultiAdapterRouter] = {}
    for path, module in found:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        wrapper = MultiAdapterExperts(module, context, num_slots, kernels, shared)
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
