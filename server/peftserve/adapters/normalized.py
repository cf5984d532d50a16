"""The few forms every adapter kind is normalized into at load time (DESIGN.md, Decision 3)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

AdapterKind = Literal["lora", "sparse", "prefix"]


@dataclass(frozen=True)
class LoraDelta:
    """A low-rank update dW = b @ a of one module, with the adapter's scaling already folded into b."""

    a: torch.Tensor
    """[r, in]"""
    b: torch.Tensor
    """[out, r]"""

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of the module it updates."""
        return self.b.shape[0], self.a.shape[1]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LoraDelta:
        return LoraDelta(
            a=self.a.to(device=device, dtype=dtype).contiguous(),
            b=self.b.to(device=device, dtype=dtype).contiguous(),
        )


@dataclass(frozen=True)
class SparseDelta:
    """A sparse update dW[rows[i], cols[i]] += values[i] of one module (duplicates accumulate)."""

    rows: torch.Tensor
    """[k] int64, output feature of each entry"""
    cols: torch.Tensor
    """[k] int64, input feature of each entry"""
    values: torch.Tensor
    """[k]"""

    @property
    def nnz(self) -> int:
        return self.values.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype) -> SparseDelta:
        return SparseDelta(
            rows=self.rows.to(device),
            cols=self.cols.to(device),
            values=self.values.to(device=device, dtype=dtype),
        )


@dataclass(frozen=True)
class ExpertLoraDelta:
    """A low-rank update of every expert of one stacked expert parameter (LoRA via target_parameters):
    dW_e = b[e] @ a[e] for expert e, scaling folded into b, in (out, in) orientation."""

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

    def to(self, device: torch.device | str, dtype: torch.dtype) -> ExpertLoraDelta:
        return ExpertLoraDelta(
            a=self.a.to(device=device, dtype=dtype).contiguous(),
            b=self.b.to(device=device, dtype=dtype).contiguous(),
        )


Delta = LoraDelta | SparseDelta | ExpertLoraDelta


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
    """The peft_type it was saved as (LORA, ADALORA, PREFIX_TUNING, SHIRA)."""
    kind: AdapterKind
    deltas: dict[str, Delta] = field(default_factory=dict)
    """Module path in the base model (e.g. 'model.layers.0.mlp.up_proj') -> its delta; empty for prefix."""
    prefix: PrefixKV | None = None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every value the layers or the KV cache compute with, scalings folded in."""
        if self.prefix is not None:
            return [("prefix key/value", self.prefix.kv)]
        named: list[tuple[str, torch.Tensor]] = []
        for path, d in self.deltas.items():
            if isinstance(d, (LoraDelta, ExpertLoraDelta)):
                named += [(f"{path}.lora_A", d.a), (f"{path}.lora_B x scaling", d.b)]
            else:
                named.append((f"{path}.values", d.values))
        return named

    @property
    def nbytes(self) -> int:
        if self.prefix is not None:
            return self.prefix.kv.numel() * self.prefix.kv.element_size()
        total = 0
        for d in self.deltas.values():
            low_rank = isinstance(d, (LoraDelta, ExpertLoraDelta))
            tensors = (d.a, d.b) if low_rank else (d.rows, d.cols, d.values)
            total += sum(t.numel() * t.element_size() for t in tensors)
        return total
