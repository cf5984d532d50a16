"""Row scaling: of the layer input before the base layer (IA³ on feedforward modules), or of the base
output after it (IA³ elsewhere; DoRA's magnitude over the merged weight's norm).

Both are stored as shifts v = scale - 1, so a mixture of weights w_i adds sum_i w_i * v_i to the identity:
the merged-weights reading of a mixture, W' = W + sum_i w_i * dW_i, that every other form follows too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..batch import AdapterBatch
from .base import Delta, Form, Stage, triton_kernel


def input_scale_reference(
    xs: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[InputScaleDelta | None]
) -> None:
    """Reference, one sequence at a time.

    Semantics: for every span (start, len, pairs) and token t in it,
        xs[t] += sum_{(s, w) in pairs} w * v[s] * x[t]        (elementwise over the in features)
    so the base layer computes W (x[t] * (1 + sum w * v[s])) + bias: IA³'s W (x * l) for one adapter.
    """
    for start, length, pairs in batch.spans:
        for slot, weight in pairs:
            d = slots[slot]
            if d is not None:
                xs[start : start + length] += weight * d.shift * x[start : start + length]


def _vectors(slots: Sequence, batch: AdapterBatch) -> tuple[list[int], torch.Tensor | None]:
    """The step's slots holding a delta here, and their shift vectors stacked ([m, features])."""
    members = [slot for slot in sorted(batch.slots) if slots[slot] is not None]
    return members, torch.stack([slots[s].shift for s in members]) if members else None


def input_scale_grouped(
    xs: torch.Tensor, x: torch.Tensor, batch: AdapterBatch, slots: Sequence[InputScaleDelta | None]
) -> None:
    """Fast path: every slot's rows at once (one gather, one multiply, one index_add_).

    Semantics: same as input_scale_reference.
    """
    members, shifts = _vectors(slots, batch)
    if not members:
        return
    rows = batch.gather(tuple(members))
    term = x.index_select(0, rows.index).mul_(shifts[rows.member]).mul_(rows.weight)  # [N, in]
    xs.index_add_(0, rows.index, term)


class InputScaleForm(Form):
    stage = Stage.INPUT
    name = "input_scale"
    kernels = {
        "reference": input_scale_reference,
        "grouped": input_scale_grouped,
        "triton": triton_kernel("input_scale_triton"),
    }

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.slots)


@dataclass(frozen=True)
class InputScaleDelta(Delta):
    """The base layer reads x * (1 + shift) instead of x (IA³ on a feedforward module: l = 1 + shift)."""

    form: ClassVar[type[Form]] = InputScaleForm

    shift: torch.Tensor
    """[in]"""
    label: str = "input scale - 1"
    """What the shift is, in the adapter's own terms (for messages)."""

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(self.label, self.shift)]

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if self.shift.shape != (shape[1],):
            return f"an input scaling of {self.shift.shape[0]} features, the base module takes {shape[1]}"
        return None


def output_scale_reference(
    y: torch.Tensor,
    y0: torch.Tensor,
    batch: AdapterBatch,
    slots: Sequence[OutputScaleDelta | None],
    bias: torch.Tensor | None,
) -> None:
    """Reference, one sequence at a time.

    Semantics: for every span (start, len, pairs) and token t in it,
        y[t] += sum_{(s, w) in pairs} w * v[s] * (y0[t] - (bias if slots[s] excludes it else 0))
    y0 is the base output (y itself before any write). IA³: y0 * l; DoRA: y0 + (g - 1) * (y0 - bias).
    """
    for start, length, pairs in batch.spans:
        base = y0[start : start + length]  # [n, out]
        delta = None
        for slot, weight in pairs:
            d = slots[slot]
            if d is None:
                continue
            src = base - bias if (bias is not None and not d.with_bias) else base
            term = weight * d.shift * src
            delta = term if delta is None else delta + term
        if delta is not None:
            y[start : start + length] += delta


def output_scale_grouped(
    y: torch.Tensor,
    y0: torch.Tensor,
    batch: AdapterBatch,
    slots: Sequence[OutputScaleDelta | None],
    bias: torch.Tensor | None,
) -> None:
    """Fast path: every slot's rows at once, read from y0 before anything is written (y0 may be y).

    Semantics: same as output_scale_reference.
    """
    members, shifts = _vectors(slots, batch)
    if not members:
        return
    rows = batch.gather(tuple(members))
    term = y0.index_select(0, rows.index)  # [N, out]
    if bias is not None and not all(slots[s].with_bias for s in members):
        without = torch.tensor([not slots[s].with_bias for s in members], device=y.device, dtype=y.dtype)
        term.sub_(without[rows.member, None] * bias)
    term.mul_(shifts[rows.member]).mul_(rows.weight)
    y.index_add_(0, rows.index, term)


class OutputScaleForm(Form):
    stage = Stage.OUTPUT
    name = "output_scale"
    kernels = {
        "reference": output_scale_reference,
        "grouped": output_scale_grouped,
        "triton": triton_kernel("output_scale_triton"),
    }

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        self.kernel(y, x, batch, self.slots, self.spec.bias)


@dataclass(frozen=True)
class OutputScaleDelta(Delta):
    """The base output scaled by (1 + shift) per output feature, with or without the bias."""

    form: ClassVar[type[Form]] = OutputScaleForm

    shift: torch.Tensor
    """[out]"""
    with_bias: bool
    """True: the whole output is scaled (IA³ scales the bias too); False: only W x (DoRA)."""
    label: str = "output scale - 1"
    """What the shift is, in the adapter's own terms (for messages)."""

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [(self.label, self.shift)]

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if self.shift.shape != (shape[0],):
            return f"an output scaling of {self.shift.shape[0]} features, the base module gives {shape[0]}"
        return None
