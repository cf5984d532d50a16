"""MultiAdapterLayer: a frozen base Linear/Conv1D plus per-slot deltas, one compute form each."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .batch import AdapterBatch, AdapterContext
from .experts import MultiAdapterRouter, wrap_experts
from .forms import BaseModule, Delta, Form, LayerSpec, SharedTensors, Stage
from .forms.experts import ExpertStackForm

WRAPPABLE = (nn.Linear, Conv1D)


def module_shape(module: nn.Module) -> tuple[int, int]:
    """(out, in) of a Linear or a GPT-2 Conv1D (whose weight is stored [in, out])."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, Conv1D):
        return module.nf, module.weight.shape[0]
    raise TypeError(f"cannot wrap {type(module).__name__}")


class MultiAdapterLayer(nn.Module):
    """Runs the untouched base layer once for all tokens, with each token's deltas around it.

    Each registered form holds the deltas of its slots. Per step, the forms whose slots are in the batch
    run in stage order: INPUT forms scale rows of a copy of the input, the base layer runs once, OUTPUT
    forms read the base output, ADD forms add from the input. Rows of tokens with no adapter are never
    written, so they are bitwise the base output.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        context: AdapterContext,
        forms: Sequence[type[Form]],
        num_slots: int,
        kernels: str,
        shared: SharedTensors,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.out_features, self.in_features = module_shape(base_layer)
        self.context = context
        self.num_slots = num_slots
        spec = LayerSpec(
            self.in_features, self.out_features, num_slots, getattr(base_layer, "bias", None), kernels, shared
        )
        self.forms: dict[type[Form], Form] = {cls: cls(spec) for cls in forms}
        self._holding: dict[int, list[Form]] = {}  # slot -> the forms holding a part of its delta
        self._ready: torch.cuda.Event | None = None  # fences the copies of the latest load (CUDA)

    def base_module(self) -> BaseModule:
        """The base layer as a delta sees it when it binds (shape, and its weight as [out, in])."""
        return BaseModule((self.out_features, self.in_features), self._base_weight)

    def _base_weight(self) -> torch.Tensor:
        weight = self.base_layer.weight
        return weight.T if isinstance(self.base_layer, Conv1D) else weight  # [out, in]

    def load(self, slot: int, delta: Delta, ready: torch.cuda.Event | None = None) -> None:
        """Put a delta (already on the layer's device and dtype) into a slot, each part in its form.

        ready: the event its host -> device copies complete at (transfer.py); the next forward waits for it.
        """
        self.clear(slot)
        if ready is not None:
            self._ready = ready  # later copies on the copier's one stream fence the earlier ones too
        holding = []
        for part in delta.parts():
            form = self.forms.get(part.form)
            if form is None:
                raise TypeError(
                    f"{part.form.__name__} is not among the layer's forms (kinds.py registers it)"
                )
            form.load(slot, part)
            holding.append(form)
        self._holding[slot] = holding

    def wait_for_copies(self) -> None:
        """Make the compute stream wait for the host -> device copies of the latest load (CUDA)."""
        if self._ready is not None:
            torch.cuda.current_stream(self.base_layer.weight.device).wait_event(self._ready)
            self._ready = None

    def clear(self, slot: int) -> None:
        for form in self._holding.pop(slot, ()):
            form.clear(slot)

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        batch = self.context.batch
        if batch is None:
            return self.base_layer(x, *args, **kwargs)
        self.wait_for_copies()
        if batch.forms is not None:
            active = [self.forms[cls] for cls in batch.forms if cls in self.forms]
        else:
            active = [form for form in self.forms.values() if form.active(batch)]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        x2 = x.reshape(-1, self.in_features)  # [T, in]
        if x2.shape[0] != batch.num_tokens:
            raise RuntimeError(f"adapter batch is for {batch.num_tokens} tokens, layer got {x2.shape[0]}")
        inputs = [f for f in active if f.stage is Stage.INPUT]
        outputs = [f for f in active if f.stage is Stage.OUTPUT]
        if inputs:
            xs = x2.clone()  # the base layer reads the scaled rows; the ADD forms read x itself
            for form in inputs:
                form.apply(xs, x2, batch)
            out = self.base_layer(xs.view_as(x), *args, **kwargs)
        else:
            out = self.base_layer(x, *args, **kwargs)
        y2 = out.view(-1, self.out_features)  # [T, out], a view: updates land in `out`
        if outputs:
            y0 = self._base_output(y2, x2, batch, inputs, outputs, *args, **kwargs)
            for form in outputs:
                form.apply(y2, y0, batch)
        for form in active:
            if form.stage is Stage.ADD:
                form.apply(y2, x2, batch)
        return out

    def _base_output(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        batch: AdapterBatch,
        inputs: list[Form],
        outputs: list[Form],
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        """What OUTPUT forms read as the base output: y itself, unless a token also had its input scaled
        here (a mixture of both), whose base output is then recomputed from the unscaled input, or several
        OUTPUT forms write the same rows (each must read them unwritten)."""
        rows: list[torch.Tensor] = []
        if inputs:
            scaled = set().union(*(f.active_slots(batch) for f in inputs))
            read = set().union(*(f.active_slots(batch) for f in outputs))
            rows = [
                torch.arange(start, start + length)
                for start, length, pairs in batch.spans
                if any(s in scaled for s, _ in pairs) and any(s in read for s, _ in pairs)
            ]
        if not rows:
            return y if len(outputs) == 1 else y.clone()
        y0 = y.clone()
        index = torch.cat(rows).to(y.device)  # [n]
        y0[index] = self.base_layer(x.index_select(0, index), *args, **kwargs)
        return y0

    def extra_repr(self) -> str:
        forms = ", ".join(cls.__name__ for cls in self.forms)
        return f"in={self.in_features}, out={self.out_features}, slots={self.num_slots}, forms=[{forms}]"


AdapterTarget = MultiAdapterLayer | ExpertStackForm | MultiAdapterRouter
"""What a delta loads into by path: a wrapped Linear/Conv1D, an expert stack or a router."""


def wrap_model(
    model: nn.Module,
    context: AdapterContext,
    forms: Sequence[type[Form]],
    num_slots: int,
    kernels: str,
    shared: SharedTensors,
) -> dict[str, AdapterTarget]:
    """Wrap every Linear/Conv1D of the model except the output head, and its experts, once, at start.

    Wrapping everything up front keeps the module tree fixed while serving (registering an adapter never
    mutates the model under a running forward); an unused wrapper costs one check per form and call.
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
        wrapper = MultiAdapterLayer(module, context, forms, num_slots, kernels, shared)
        setattr(parent, name, wrapper)
        layers[path] = wrapper
    layers.update(wrap_experts(model, context, num_slots, kernels, shared))
    return layers
