"""MultiAdapterLayer: a frozen base Linear/Conv1D plus per-slot deltas applied per token."""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import AdapterContext
from .experts import ExpertParameter, MultiAdapterRouter, wrap_experts
from .kernels import DeltaKernels
from .normalized import Delta, LoraDelta, SparseDelta

WRAPPABLE = (nn.Linear, Conv1D)


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or a GPT-2 Conv1D (whose weight is stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    raise TypeError(f"cannot wrap {type(module).__name__}")


class MultiAdapterLayer(nn.Module):
    """Calls the untouched base layer once for all tokens, then adds each token's adapter deltas.

    Deltas live in slots (one list entry per slot, each with its own rank). Rows of tokens with no
    adapter in the step are never written, so they are bitwise the base output.
    """

    def __init__(self, base_layer: nn.Module, context: AdapterContext, kernels: DeltaKernels, num_slots: int):
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = module_shape(base_layer)
        self.context = context
        self.kernels = kernels
        self.lora_slots: list[LoraDelta | None] = [None] * num_slots
        self.sparse_slots: list[SparseDelta | None] = [None] * num_slots
        self.lora_loaded: set[int] = set()
        self.sparse_loaded: set[int] = set()

    def load(self, slot: int, delta: Delta) -> None:
        """Put a delta (already on the layer's device and dtype) into a slot."""
        self.clear(slot)
        if isinstance(delta, LoraDelta):
            self.lora_slots[slot] = delta
            self.lora_loaded.add(slot)
        else:
            self.sparse_slots[slot] = delta
            self.sparse_loaded.add(slot)

    def clear(self, slot: int) -> None:
        self.lora_slots[slot] = None
        self.sparse_slots[slot] = None
        self.lora_loaded.discard(slot)
        self.sparse_loaded.discard(slot)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        batch = self.context.batch
        if batch is None:
            return out
        has_lora = not self.lora_loaded.isdisjoint(batch.slots)
        has_sparse = not self.sparse_loaded.isdisjoint(batch.slots)
        if not (has_lora or has_sparse):
            return out
        x2 = x.reshape(-1, self.in_features)  # [T, in]
        y2 = out.view(-1, self.out_features)  # [T, out], a view: updates land in `out`
        if x2.shape[0] != batch.num_tokens:
            raise RuntimeError(f"adapter batch is for {batch.num_tokens} tokens, layer got {x2.shape[0]}")
        if has_lora:
            self.kernels.lora(y2, x2, batch, self.lora_slots)
        if has_sparse:
            self.kernels.sparse(y2, x2, batch, self.sparse_slots)
        return out

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={len(self.lora_slots)}"


AdapterTarget = MultiAdapterLayer | ExpertParameter | MultiAdapterRouter
"""What a delta loads into by path: a wrapped Linear/Conv1D, an expert stack or a router."""


def wrap_model(
    model: nn.Module, context: AdapterContext, kernels: DeltaKernels, num_slots: int
) -> dict[str, AdapterTarget]:
    """Wrap every Linear/Conv1D of the model except the output head, and its experts, once, at start.

    Wrapping everything up front keeps the module tree fixed while serving (registering an adapter never
    mutates the model under a running forward); an unused wrapper costs one attribute check per call.
    The output head is left alone: the runner computes logits only at kept positions, so its rows are
    not the step's tokens. Experts modules and their routers: experts.py.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, WRAPPABLE) and module is not head and not isinstance(module, MultiAdapterLayer)
    ]
    layers: dict[str, AdapterTarget] = {}
    for path, module in targets:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = MultiAdapterLayer(module, context, kernels, num_slots)
        setattr(parent, name, wrapper)
        layers[path] = wrapper
    layers.update(wrap_experts(model, context, num_slots))
    return layers
