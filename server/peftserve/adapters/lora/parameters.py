"""LoRA on parameters (peft's `target_parameters`): mixture-of-experts weights and routers.

peft adapts a parameter by wrapping its module in a ParamWrapper; several parameters of one module nest
the wrappers, innermost first in the order the module defines them, so their tensors are saved as
`<module>.lora_A.weight` (the last targeted parameter), `<module>.base_layer.lora_A.weight` (the one
before), and so on. For a stack of E experts, lora_A is [E*r, in] (expert-major rows) and lora_B is
[out, r*E] (rank-major columns): expert e's update is scaling * B_e @ A_e with
A_e = A.view(E, r, in)[e] and B_e = B.view(out, r, E)[:, :, e], in (out, in) orientation whatever the
layout the experts store (peft swaps in/out for non-transposed stacks). r and alpha come from
rank_pattern/alpha_pattern matched against the parameter's path ('<module>.<param>'), as peft does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import SimpleNamespace

import torch
from peft.tuners.tuners_utils import check_target_module_exists

from peftserve.errors import AdapterRejected

from ..forms import Delta, LowRankDelta
from ..forms.experts import ExpertLowRankDelta
from ..peft_format import STATE_PREFIX, Config, Tensors, check_scaling, rank_and_alpha

WRAPPER = ".base_layer"
PARAMETER_ORDER = ("weight", "gate_up_proj", "up_proj", "down_proj")
"""The parameters LoRA may target, in the order their modules define them: a router's (or a Linear's)
weight, and the experts' up projection (fused with the gate or not) before the down projection, as every
experts module of transformers 5 declares them. peft nests wrappers in that order."""
EXPERT_PARAMETERS = PARAMETER_ORDER[1:]
LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
MATCHING_FIELDS = (
    "target_modules",
    "target_parameters",
    "exclude_modules",
    "modules_to_save",
    "layers_to_transform",
    "layers_pattern",
)
"""The config fields peft's check_target_module_exists reads."""

Pairs = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""wrapper depth -> (lora_A, lora_B) of one module's nested ParamWrappers."""


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


def split_parameter_tensors(config: Config, tensors: Tensors) -> tuple[Tensors, dict[str, Pairs]]:
    """(the tensors of module LoRA, as saved; {module: its nested (lora_A, lora_B) by depth})."""
    by_module: Tensors = {}
    by_parameter: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in LORA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or not key.startswith(STATE_PREFIX):
            by_module[key] = value  # lora_modules rejects what it does not serve, by name
            continue
        module, depth = split_wrapper(key[len(STATE_PREFIX) : -len(suffix)])
        if adapted_by_parameter(config, module, depth):
            by_parameter.setdefault(module, {}).setdefault(depth, {})[suffix] = value
        else:
            by_module[key] = value
    pairs: dict[str, Pairs] = {}
    for module, depths in by_parameter.items():
        for depth, found in depths.items():
            missing = [s[1:] for s in LORA_SUFFIXES if s not in found]
            if missing:
                raise AdapterRejected(f"module {module!r}: {missing[0]} is missing")
            pairs.setdefault(module, {})[depth] = (found[LORA_SUFFIXES[0]], found[LORA_SUFFIXES[1]])
    return by_module, pairs


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


def parameter_deltas(config: Config, modules: dict[str, Pairs]) -> dict[str, Delta]:
    """The deltas of every module's nested ParamWrappers: {module: {depth: (A, B)}} -> {path: delta}.

    A 2-D weight (a router, or a Linear adapted by parameter) becomes a LowRankDelta at the module's path;
    an expert stack an ExpertLowRankDelta at `<module>.<param>`.
    """
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterRejected(f"target_parameters={targets!r}: expected a list of parameter names")
    deltas: dict[str, Delta] = {}
    for module, pairs in sorted(modules.items()):
        names = targeted(module, targets)
        if sorted(pairs) != list(range(len(names))):
            raise AdapterRejected(
                f"module {module!r}: {len(pairs)} nested lora_A/lora_B pairs, but target_parameters names "
                f"{len(names)} of its parameters ({', '.join(names) or 'none'})"
            )
        for depth, (a, b) in pairs.items():
            name = names[len(names) - 1 - depth]  # the outermost wrapper holds the last parameter
            path = f"{module}.{name}"
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or a.shape[0] == 0:
                raise AdapterRejected(
                    f"parameter {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form "
                    "(experts * r, in), (out, r * experts)"
                )
            if name == "weight":
                deltas[module] = LowRankDelta(a=a.float(), b=b.float() * _scaling(config, path, a.shape[0]))
            else:
                deltas[path] = _expert_delta(config, path, a, b)
    return deltas


def _expert_delta(config: Config, path: str, a: torch.Tensor, b: torch.Tensor) -> ExpertLowRankDelta:
    """peft's [E*r, in] / [out, r*E] factors of an expert stack as per-expert [E, r, in] / [E, out, r]."""
    rows = a.shape[0]
    conf = rank_and_alpha(config, path, 8, "lora_alpha", 8)
    if rows % conf.r:
        raise AdapterRejected(
            f"parameter {path!r}: lora_A has {rows} rows, not a multiple of the configured rank {conf.r} "
            f"({conf.r_field})"
        )
    experts = rows // conf.r
    a_e = a.float().view(experts, conf.r, a.shape[1])  # [E, r, in]
    b_e = b.float().view(b.shape[0], conf.r, experts).permute(2, 0, 1)  # [E, out, r]
    scaling = _scaling(config, path, conf.r)
    return ExpertLowRankDelta(a=a_e.contiguous(), b=(b_e * scaling).contiguous())


def _scaling(config: Config, path: str, rank: int) -> float:
    """alpha/r (alpha/sqrt(r) with use_rslora) at `path`, whose factors must have the configured r."""
    conf = rank_and_alpha(config, path, 8, "lora_alpha", 8)
    if conf.r != rank:
        raise AdapterRejected(f"parameter {path!r}: {conf.r_field}={conf.r!r} but lora_A has rank {rank}")
    scaling = conf.alpha / math.sqrt(rank) if config.get("use_rslora") else conf.alpha / rank
    return check_scaling(scaling, f"parameter {path!r}: {conf.alpha_field} and rank {rank}")
