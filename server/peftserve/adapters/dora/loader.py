"""LORA directories with use_dora -> DoRA: the low-rank update, rescaled per row by magnitude / norm.

peft computes, with g = m / ||W + s B A|| (the norm per output row, treated as a constant),
    y = base(x) + (g - 1) * (base(x) - bias) + g * s * B A x.
The norms need the base weight, so a loaded DoRA delta binds to its module once (at host load), and is
then served as two forms in one slot: an output scaling by g - 1 (the bias left out) and a low-rank
update with g folded into B. A step costs a LoRA plus one multiply-add per output feature.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from peftserve.errors import AdapterRejected

from ..forms import BaseModule, Delta, Form, JointDelta, LowRankDelta, LowRankForm, OutputScaleDelta
from ..lora import lora_modules
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors

MAGNITUDE = "lora_magnitude_vector"


@dataclass(frozen=True)
class DoraDelta(Delta):
    """A DoRA module as stored: its low-rank update and magnitude, not yet bound to the base weight."""

    form: ClassVar[type[Form]] = LowRankForm
    needs_base: ClassVar[bool] = True

    update: LowRankDelta
    """A [r, in] and B [out, r] with the LoRA scaling folded into B."""
    magnitude: torch.Tensor
    """[out]"""

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"a": self.update.a, "b": self.update.b, "magnitude": self.magnitude}

    @property
    def rank(self) -> int:
        return self.update.rank

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Delta:
        raise TypeError("a DoRA delta is served once bound to its base module (bind)")

    def misfit(self, shape: tuple[int, int]) -> str | None:
        if self.magnitude.shape != (shape[0],):
            return f"{MAGNITUDE} has {self.magnitude.shape[0]} entries, the base module gives {shape[0]}"
        return self.update.misfit(shape)

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return self.update.rank

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        return self.update.over_limit(shape, max_rank)

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [*self.update.served_tensors(), (MAGNITUDE, self.magnitude)]

    def bind(self, module: BaseModule) -> JointDelta:
        """g = m / ||W + s B A|| per output row, computed in float32 on the weight's device."""
        weight = module.weight()  # [out, in]
        a, b = (t.to(weight.device, torch.float32) for t in (self.update.a, self.update.b))
        with torch.no_grad():
            norm = torch.linalg.vector_norm(weight.float() + b @ a, dim=1)  # [out]
            g = (self.magnitude.to(weight.device, torch.float32) / norm).cpu()
        return JointDelta(
            (
                OutputScaleDelta(shift=g - 1.0, with_bias=False, label=f"{MAGNITUDE}/norm"),
                LowRankDelta(a=self.update.a, b=self.update.b * g[:, None], origin="DoRA"),
            )
        )


def uses_dora(config: Config) -> bool:
    return bool(config.get("use_dora"))


def load_dora(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a LORA directory saved with use_dora (rslora and rank/alpha patterns as for LoRA)."""
    deltas: dict[str, Delta] = {}
    for path, (update, extras) in lora_modules(config, tensors, extra=(MAGNITUDE,)).items():
        magnitude = extras[MAGNITUDE]
        if magnitude.dim() != 1:
            raise AdapterRejected(
                f"module {path!r}: {MAGNITUDE} has shape {tuple(magnitude.shape)}, not (out,)"
            )
        deltas[path] = DoraDelta(update=update, magnitude=magnitude.to(torch.float32))
    return NormalizedAdapter(peft_type="LORA", kind="dora", deltas=deltas)
