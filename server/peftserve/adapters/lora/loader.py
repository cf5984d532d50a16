"""LORA directories -> per-module LoraDelta (scaling folded into B, each module keeps its own rank)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from peftserve.errors import AdapterRejected

from ..normalized import Delta, LoraDelta, NormalizedAdapter
from ..peft_format import Config, Tensors, check_scaling, finite_number, module_tensors, reject_if_set
from .parameters import adapted_by_parameter, parameter_deltas, split_wrapper

UNCONVERTED_INITS = ("pissa", "olora", "lora_ga", "corda", "loftq", "mica")
"""init_lora_weights values whose saved A/B are not a delta over the unmodified base weights."""

UNSERVED_FIELDS: dict[str, str] = {
    "use_dora": "DoRA rescales the merged weight per column and is not served",
    "lora_bias": "a trained lora_B bias is not served",
    "alora_invocation_tokens": "activated LoRA (aLoRA) is not served",
    "layer_replication": "layer replication changes the base model and is not served",
    "trainable_token_indices": "trainable token embeddings are not served",
    "use_qalora": "QALoRA is not served",
    "use_bdlora": "BD-LoRA is not served",
    "arrow_config": "Arrow routing is not served",
    "kasa_config": "KaSA modifies the base weights and is not served",
    "monteclora_config": "MonteCLoRA is not served",
}


def check_lora_family_config(config: Config, parameters_served: bool = False) -> None:
    """Flags shared by LORA and ADALORA that would change what the forward computes.

    target_parameters is served for LoRA (experts and routers, lora/parameters.py), never for AdaLoRA.
    """
    for field, why in UNSERVED_FIELDS.items():
        reject_if_set(config, field, why)
    if not parameters_served:
        reject_if_set(config, "target_parameters", "adapting nn.Parameter targets is served for LoRA only")
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterRejected(f"bias={bias!r}: trained base biases are not served (only bias='none')")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(UNCONVERTED_INITS):
        raise AdapterRejected(
            f"init_lora_weights={init!r}: this initialization modifies the base weights; save the adapter "
            "with save_pretrained(..., path_initial_model_for_weight_conversion=...) to get plain LoRA"
        )


def match_pattern(patterns: Mapping[str, object], module_path: str) -> str | None:
    """The first key of a rank_pattern/alpha_pattern that names this module, as peft resolves it.

    A key matches when it is a regex matching the whole path or a '.'-separated suffix of it.
    """
    for key in patterns:
        try:
            if re.fullmatch(rf"(?:.*\.)?(?:{key})", module_path):
                return key
        except re.error as exc:
            raise AdapterRejected(f"pattern key {key!r} is not a valid regex ({exc})") from exc
    return None


def _pattern(config: Config, field: str) -> Mapping[str, object]:
    value = config.get(field) or {}
    if not isinstance(value, Mapping):
        raise AdapterRejected(f"{field}: expected an object mapping module patterns to numbers")
    return value


@dataclass(frozen=True)
class LoraScaling:
    """r and alpha of a LoRA config per module or parameter path, as peft resolves them."""

    default_r: object
    default_alpha: float
    rank_pattern: Mapping[str, object]
    alpha_pattern: Mapping[str, object]
    use_rslora: bool

    @classmethod
    def of(cls, config: Config) -> LoraScaling:
        return cls(
            default_r=config.get("r", 8),
            default_alpha=finite_number(config, "lora_alpha", 8),
            rank_pattern=_pattern(config, "rank_pattern"),
            alpha_pattern=_pattern(config, "alpha_pattern"),
            use_rslora=bool(config.get("use_rslora", False)),
        )

    def _rank(self, path: str) -> tuple[object, str]:
        key = match_pattern(self.rank_pattern, path)
        if key is None:
            return self.default_r, "r"
        return self.rank_pattern[key], f"rank_pattern[{key!r}]"

    def rank(self, path: str) -> int:
        r, field = self._rank(path)
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise AdapterRejected(f"{path!r}: {field}={r!r} is not a positive integer")
        return r

    def scaling(self, path: str, rank: int) -> float:
        """alpha/r (alpha/sqrt(r) with use_rslora) at `path`, whose factors must have the configured r."""
        configured, field = self._rank(path)
        if configured != rank:
            raise AdapterRejected(f"module {path!r}: {field}={configured!r} but lora_A has rank {rank}")
        alpha_key = match_pattern(self.alpha_pattern, path)
        alpha = self.default_alpha
        if alpha_key is not None:
            alpha = finite_number(self.alpha_pattern, alpha_key)
        scaling = alpha / math.sqrt(rank) if self.use_rslora else alpha / rank
        alpha_field = f"alpha_pattern[{alpha_key!r}]" if alpha_key is not None else "lora_alpha"
        return check_scaling(scaling, f"module {path!r}: {alpha_field} and rank {rank}")


def load_lora(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a LORA directory.

    Scaling per module is alpha/r (alpha/sqrt(r) with use_rslora), where r and alpha come from
    rank_pattern/alpha_pattern when a key matches the module path, else from r/lora_alpha. Modules
    adapted through target_parameters (their tensors nest under `.base_layer`) go to parameter_deltas.
    """
    check_lora_family_config(config, parameters_served=True)
    scaling = LoraScaling.of(config)
    targets = config.get("target_parameters") or []
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        raise AdapterRejected(f"target_parameters={targets!r}: expected a list of parameter names")

    modules = module_tensors(tensors, ("lora_A.weight", "lora_B.weight"))
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no lora_A/lora_B tensors")
    deltas: dict[str, Delta] = {}
    wrapped: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for path, params in sorted(modules.items()):
        for needed in ("lora_A.weight", "lora_B.weight"):
            if needed not in params:
                raise AdapterRejected(f"module {path!r}: {needed} is missing")
        a = params["lora_A.weight"]  # [r, in]
        b = params["lora_B.weight"]  # [out, r]
        module, depth = split_wrapper(path)
        if adapted_by_parameter(config, module, depth):
            wrapped.setdefault(module, {})[depth] = (a, b)
            continue
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterRejected(
                f"module {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "do not form (r, in), (out, r)"
            )
        rank = a.shape[0]
        if rank == 0:
            raise AdapterRejected(f"module {path!r}: rank 0 (lora_A has no rows)")
        deltas[path] = LoraDelta(a=a.to(torch.float32), b=b.to(torch.float32) * scaling.scaling(path, rank))
    for module, pairs in wrapped.items():
        for path, delta in parameter_deltas(module, pairs, targets, scaling).items():
            if path in deltas:
                raise AdapterRejected(f"{path!r} is adapted twice (target_modules and target_parameters)")
            deltas[path] = delta
    return NormalizedAdapter(peft_type="LORA", kind="lora", deltas=deltas)
