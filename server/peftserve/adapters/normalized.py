"""One adapter after loading: a delta per module in the forms the layers compute, or prefix K/V."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

from .forms import BaseModule, Delta, shared_nbytes


@dataclass(frozen=True)
class PrefixKV:
    """Per-layer keys and values of a prefix-tuning adapter, as they go into the first KV blocks."""

    kv: torch.Tensor
    """[num_layers, 2 (key, value), kv_heads, num_virtual_tokens, head_dim]; keys are post-RoPE as-is."""

    @property
    def num_virtual_tokens(self) -> int:
        return self.kv.shape[3]


@dataclass(frozen=True)
class NormalizedAdapter:
    """One adapter directory after loading: what the layers (or the KV cache) compute, nothing else."""

    peft_type: str
    """The peft_type it was saved as (LORA, ADALORA, IA3, LOHA, LOKR, VERA, PREFIX_TUNING, SHIRA)."""
    kind: str
    """The kind it is served as (kinds.py): lora, adalora, dora, ia3, loha, lokr, vera, sparse, prefix."""
    deltas: dict[str, Delta] = field(default_factory=dict)
    """Module path in the base model (e.g. 'model.layers.0.mlp.up_proj') -> its delta; empty for prefix."""
    prefix: PrefixKV | None = None

    @property
    def needs_base(self) -> bool:
        """Some delta is only servable after bind() (DoRA reads the base weights)."""
        return any(d.needs_base for d in self.deltas.values())

    def bind(self, module_of: Callable[[str], BaseModule]) -> NormalizedAdapter:
        """The adapter with every delta that reads the base module bound to it (the others as they are)."""
        if not self.needs_base:
            return self
        bound = {p: d.bind(module_of(p)) if d.needs_base else d for p, d in self.deltas.items()}
        return replace(self, deltas=bound)

    def pin_memory(self) -> NormalizedAdapter:
        """The adapter with its deltas in page-locked memory, so their copies to a GPU run asynchronously."""
        return replace(self, deltas={p: d.pin_memory() for p, d in self.deltas.items()})

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every value the layers or the KV cache compute with, scalings folded in."""
        if self.prefix is not None:
            return [("prefix key/value", self.prefix.kv)]
        return [(f"{path}.{name}", t) for path, d in self.deltas.items() for name, t in d.served_tensors()]

    @property
    def forms(self) -> tuple[tuple[str, int], ...]:
        """(form name, modules computed by it), sorted by name: how the adapter is served."""
        counts = Counter(part.form.name for d in self.deltas.values() for part in d.parts())
        return tuple(sorted(counts.items()))

    def needed_rank(self, shapes: Mapping[str, tuple[int, int]]) -> int:
        """The smallest max_rank that serves it, given each target module's (out, in)."""
        return max((d.needed_rank(shapes[p]) for p, d in self.deltas.items()), default=0)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The distinct ranks of its deltas (those with one), sorted."""
        return tuple(sorted({d.rank for d in self.deltas.values() if d.rank is not None}))

    @property
    def nbytes(self) -> int:
        """Host memory it holds (the host cache's measure)."""
        if self.prefix is not None:
            return self.prefix.kv.numel() * self.prefix.kv.element_size()
        return sum(d.nbytes() for d in self.deltas.values()) + shared_nbytes(list(self.deltas.values()))

    def device_nbytes(self, dtype: torch.dtype) -> int:
        """Bytes its slot (or prefix cache entry) holds on the device in `dtype`, shared tensors excluded."""
        if self.prefix is not None:
            return self.prefix.kv.numel() * dtype.itemsize
        return sum(d.nbytes(dtype) for d in self.deltas.values())

    def shared_nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of tensors held once for every adapter sharing them (VeRA's projections), in `dtype`."""
        return shared_nbytes(list(self.deltas.values()), dtype)
