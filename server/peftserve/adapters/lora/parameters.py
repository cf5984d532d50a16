"""LoRA on parameters (peft's `target_parameters`): mixture-of-experts weights and routers.

peft adapts a parameter by wrapping its module in a ParamWrapper; several parameters of one module nest
the wrappers, innermost first in the order the module defines them, so their tensors are saved as
`<module>.lora_A.weight` (the last targeted parameter), `<module>.base_layer.lora_A.weight` (the one
before), and so on. For a stack of E experts, lora_A is [E*r, in] (expert-major rows) and lora_B is
[out, r*E] (rank-major columns): expert e's update is scaling * B_e @ A_e with
A_e = A.view(E, r, in)[e] and B_e = B.view(out, r, E)[:, :, e], in (out, in) orientation whatever the
layout the experts store (peft swaps in/out for non-transposed stacks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Protocol

import torch
from peft.tuners.tuners_utils import check_target_module_exists

from peftserve.errors import AdapterRejected

from ..normalized import ExpertLoraDelta, LoraDelta

WRAPPER = ".base_layer"
PARAMETER_ORDER = ("weight", "gate_up_proj", "up_proj", "down_proj")
"""The parameters LoRA may target, in the order their modules define them: a router's (or a Linear's)
weight, and the experts' up projection (fused with the gate or not) before the down projection, as every
experts module of transformers 5 declares them. peft nests wrappers in that order."""
EXPERT_PARAMETERS = PARAMETER_ORDER[1:]


class Scaling(Protocol):
    """A LoRA config's r and alpha per module or parameter path, rank_pattern/alpha_pattern resolved."""

    def rank(self, path: str) -> int:
        """The configured r of `path`."""

    def scaling(self, path: str, rank: int) -> float:
        """The scaling peft applies at `path` whose factors have `rank`; AdapterRejected if r disagrees."""


MATCHING_FIELDS = (
    "target_modules",
    "target_parameters",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)
"""The config fields peft's check_target_module_exists reads."""


def split_wrapper(path: str) -> tuple[str, int]:
    """('model.x.experts.base_layer', ...) -> ('model.x.experts', 1): the module and the wrapper depth."""
    depth = 0
    while path.endswith(WRAPPER):
        path, depth = path[: -len(WRAPPER)], depth + 1
    return path, depth


def adapted_by_parameter(config: Mapping[str, object], module: str, depth: int) -> bool:
    """Whether the tensors saved under `module` (wrapper `depth`) come from target_parameters.

    Nested ones always do; at depth 0 the key looks like a module's LoRA, so peft's own matching of
    target_modules decides (a module target_modules names is a module LoRA).
    """
    if depth > 0:
        return True
    if not config.get("target_parameters"):
        return False
    fields = SimpleNamespace(**{name: config.get(name) for name in MATCHING_FIELDS})
    return not check_target_module_exists(fields, module)


def targeted(module: str, targets: Sequence[str]) -> list[str]:
    """The parameter names target_parameters may name on `module` (adapted by parameter), in PARAMETER_ORDER.

    A target names `<module>.<param>` when it equals it or is a '.'-separated suffix of it (peft's rule),
    so a bare 'down_proj' names that parameter on every module; names outside PARAMETER_ORDER are refused.
    """
    names = set()
    for target in targets:
        leaf = target.rpartition(".")[2]
        full = f"{module}.{leaf}"
        if full == target or full.endswith("." + target):
            if leaf not in PARAMETER_ORDER:
                raise AdapterRejected(
                    f"target_parameters: LoRA on {full!r} is not served (served: a router's or a Linear's "
                    f"weight and the experts' {', '.join(EXPERT_PARAMETERS)})"
                )
            names.add(leaf)
    return [name for name in PARAMETER_ORDER if name in names]


def parameter_deltas(
    module: str, pairs: dict[int, tuple[torch.Tensor, torch.Tensor]], targets: Sequence[str], scaling: Scaling
) -> dict[str, LoraDelta | ExpertLoraDelta]:
    """The deltas of one module's nested ParamWrappers: {depth: (lora_A, lora_B)} -> {path: delta}.

    A 2-D weight (a router, or a Linear adapted by parameter) becomes a LoraDelta at the module's path;
    an expert stack an ExpertLoraDelta at `<module>.<param>`.
    """
    names = targeted(module, targets)
    if sorted(pairs) != list(range(len(names))):
        raise AdapterRejected(
            f"module {module!r}: {len(pairs)} nested lora_A/lora_B pairs, but target_parameters names "
            f"{len(names)} of its parameters ({', '.join(names) or 'none'})"
        )
    deltas: dict[str, LoraDelta | ExpertLoraDelta] = {}
    for depth, (a, b) in pairs.items():
        name = names[len(names) - 1 - depth]  # the outermost wrapper holds the last parameter
        path = f"{module}.{name}"
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterRejected(
                f"parameter {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form "
                "(experts * r, in), (out, r * experts)"
            )
        if name == "weight":
            deltas[module] = LoraDelta(a=a.float(), b=b.float() * scaling.scaling(path, a.shape[0]))
            continue
        deltas[path] = expert_delta(path, a, b, scaling)
    return deltas


def expert_delta(path: str, a: torch.Tensor, b: torch.Tensor, scaling: Scaling) -> ExpertLoraDelta:
    """peft's [E*r, in] / [out, r*E] factors of an expert stack as per-expert [E, r, in] / [E, out, r]."""
    rows = a.shape[0]
    rank = scaling.rank(path)
    if rows % rank:
        raise AdapterRejected(
            f"parameter {path!r}: lora_A has {rows} rows, not a multiple of the configured rank {rank}"
        )
    experts = rows // rank
    a_e = a.float().view(experts, rank, a.shape[1])  # [E, r, in]
    b_e = b.float().view(b.shape[0], rank, experts).permute(2, 0, 1)  # [E, out, r]
    return ExpertLoraDelta(a=a_e.contiguous(), b=(b_e * scaling.scaling(path, rank)).contiguous())
