"""The served base model's facts, and every check of a normalized adapter against them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from peftserve.errors import AdapterRejected, FailedPrecondition
from peftserve.model.geometry import head_dim, kv_heads, text_config

from .forms import BaseModule, Delta
from .forms.experts import ExpertLowRankDelta, ExpertStackForm
from .layer import AdapterTarget
from .normalized import NormalizedAdapter
from .peft_format import check_magnitude


@dataclass(frozen=True)
class BaseSpec:
    """The base model facts adapters are validated against."""

    model_type: str
    modules: dict[str, tuple[int, int]]
    """Wrapped module path -> (out, in); an expert stack '<experts>.<param>' -> each expert's (out, in)."""
    model_paths: frozenset[str]
    """Every module path of the model (wrapped or not), to tell 'not served' from 'does not exist'."""
    num_layers: int
    kv_heads: int
    head_dim: int
    experts: dict[str, int] = field(default_factory=dict)
    """Expert stack path -> its number of experts (mixture-of-experts models only)."""

    @property
    def fingerprint(self) -> str:
        """Identifies the architecture (type, layer geometry, served module shapes): '<type>-<16 hex>'."""
        facts = [self.model_type, self.num_layers, self.kv_heads, self.head_dim, sorted(self.modules.items())]
        if self.experts:
            facts.append(sorted(self.experts.items()))
        digest = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
        return f"{self.model_type}-{digest}"


def base_spec(model: nn.Module, layers: dict[str, AdapterTarget]) -> BaseSpec:
    config = text_config(model.config)
    return BaseSpec(
        model_type=str(getattr(config, "model_type", "unknown")),
        modules={path: (m.out_features, m.in_features) for path, m in layers.items()},
        model_paths=frozenset(path for path, _ in model.named_modules()),
        num_layers=config.num_hidden_layers,
        kv_heads=kv_heads(config),
        head_dim=head_dim(config),
        experts={path: m.num_experts for path, m in layers.items() if isinstance(m, ExpertStackForm)},
    )


V4_EXPERT = re.compile(r"\.experts\.\d+\.")
"""A per-expert Linear of transformers 4 (experts.3.w1): transformers 5 stacks the experts instead."""


def _misfit(path: str, delta: Delta, base: BaseSpec) -> str | None:
    """Why one delta does not fit the base, or None when it does."""
    if path not in base.modules:
        if path in base.model_paths:
            return (
                f"target module {path!r} is not served (only Linear/Conv1D modules below the output head, "
                "expert stacks and routers)"
            )
        if V4_EXPERT.search(path):
            return (
                f"target module {path!r} does not exist in the base model: it is an expert in transformers "
                "4's layout; load the adapter with peft on transformers 5 and save it again, which stores "
                "it as LoRA on the stacked experts (target_parameters)"
            )
        return f"target module {path!r} does not exist in the base model"
    if isinstance(delta, ExpertLowRankDelta) != (path in base.experts):
        what = "an expert stack" if path in base.experts else "a module"
        return f"{path!r} is {what}; the adapter's tensors for it are of another kind"
    if isinstance(delta, ExpertLowRankDelta) and delta.num_experts != base.experts[path]:
        have = base.experts[path]
        return f"expert stack {path!r}: the adapter has {delta.num_experts} experts, the base has {have}"
    reason = delta.misfit(base.modules[path])
    return None if reason is None else f"module {path!r}: {reason}"


def check_same_base(adapter: NormalizedAdapter, base: BaseSpec) -> None:
    """FailedPrecondition when the adapter was made for another base model.

    The evidence: a prefix of another layer geometry, or deltas none of which fits (every target is
    unknown to this model or has another shape). When some fit, the misfits are the adapter's own fault
    and check_against_base rejects them as invalid.
    """
    if adapter.prefix is not None:
        num_layers, _, kv_heads, _, head_dim = adapter.prefix.kv.shape
        expected = (base.num_layers, base.kv_heads, base.head_dim)
        if (num_layers, kv_heads, head_dim) != expected:
            raise FailedPrecondition(
                f"the adapter was trained for another base model: prefix shape (num_layers, "
                f"num_attention_heads, head_dim) = {(num_layers, kv_heads, head_dim)}, the served base has "
                f"(layers, kv heads, head_dim) = {expected}"
            )
    first: str | None = None
    for path, delta in adapter.deltas.items():
        reason = _misfit(path, delta, base)
        unknown = path not in base.model_paths
        misshaped = path in base.modules and reason is not None
        if not (unknown or misshaped):
            return  # one target fits (or merely is not served): this base, with a fault of its own
        first = first or reason
    if first is not None:
        raise FailedPrecondition(f"the adapter was trained for another base model: {first}")


def check_against_base(adapter: NormalizedAdapter, base: BaseSpec) -> None:
    """Every delta's target exists, is served and has the delta's shape: AdapterRejected otherwise."""
    for path, delta in adapter.deltas.items():
        reason = _misfit(path, delta, base)
        if reason is not None:
            raise AdapterRejected(reason)


def check_limits(adapter: NormalizedAdapter, base: BaseSpec, max_rank: int) -> None:
    """Each delta within its form's limit for max_rank (a rank, or max_rank * (out + in) entries)."""
    for path, delta in adapter.deltas.items():
        reason = delta.over_limit(base.modules[path], max_rank)
        if reason is not None:
            raise AdapterRejected(f"module {path!r}: {reason}")


def validate_for_base(adapter: NormalizedAdapter, base: BaseSpec, max_rank: int) -> None:
    """Every check a normalized adapter passes before it is served: same base, fits, within limits."""
    check_same_base(adapter, base)
    check_against_base(adapter, base)
    check_limits(adapter, base, max_rank)


def fit_to_base(
    adapter: NormalizedAdapter, base: BaseSpec, max_rank: int, module_of: Callable[[str], BaseModule]
) -> NormalizedAdapter:
    """validate_for_base, then bind what reads the base (DoRA's norms) and bound what it computes."""
    validate_for_base(adapter, base, max_rank)
    if not adapter.needs_base:
        return adapter
    bound = adapter.bind(module_of)
    for name, value in bound.served_tensors():
        check_magnitude(name, value)
    return bound
