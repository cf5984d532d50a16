"""LORA directories -> per-module low-rank deltas (scaling folded into B, each module keeps its own rank)."""

from __future__ import annotations

import math

import torch

from peftserve.errors import AdapterRejected

from ..forms import Delta, LowRankDelta
from ..normalized import NormalizedAdapter
from ..peft_format import (
    Config,
    Tensors,
    check_scaling,
    module_tensors,
    rank_and_alpha,
    reject_if_set,
    require,
)
from .parameters import parameter_deltas, split_parameter_tensors

UNCONVERTED_INITS = ("pissa", "olora", "lora_ga", "corda", "loftq", "mica")
"""init_lora_weights values whose saved A/B are not a delta over the unmodified base weights."""

UNSERVED_FIELDS: dict[str, str] = {
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

LORA_PARAMS = ("lora_A.weight", "lora_B.weight")


def check_lora_family_config(config: Config, parameters_served: bool = False) -> None:
    """Flags shared by LORA and ADALORA that would change what the forward computes.

    target_parameters is served for plain LoRA (experts and routers, parameters.py) and for no other kind.
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


def lora_modules(
    config: Config, tensors: Tensors, extra: tuple[str, ...] = (), parameters_served: bool = False
) -> dict[str, tuple[LowRankDelta, dict[str, torch.Tensor]]]:
    """Every module's low-rank delta and its `extra` tensors (DoRA's magnitude), from a LORA directory.

    Scaling per module is alpha/r (alpha/sqrt(r) with use_rslora), where r and alpha come from
    rank_pattern/alpha_pattern when a key names the module (resolved by peft), else from r/lora_alpha.
    """
    check_lora_family_config(config, parameters_served)
    use_rslora = bool(config.get("use_rslora", False))
    modules = module_tensors(tensors, LORA_PARAMS + extra)
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no lora_A/lora_B tensors")
    out: dict[str, tuple[LowRankDelta, dict[str, torch.Tensor]]] = {}
    for path, params in sorted(modules.items()):
        a, b = require(params, path, *LORA_PARAMS)  # [r, in], [out, r]
        extras = dict(zip(extra, require(params, path, *extra), strict=True))
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapterRejected(
                f"module {path!r}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                "do not form (r, in), (out, r)"
            )
        rank = a.shape[0]
        if rank == 0:
            raise AdapterRejected(f"module {path!r}: rank 0 (lora_A has no rows)")
        conf = rank_and_alpha(config, path, 8, "lora_alpha", 8)
        if conf.r != rank:
            raise AdapterRejected(f"module {path!r}: {conf.r_field}={conf.r!r} but lora_A has rank {rank}")
        scaling = conf.alpha / math.sqrt(rank) if use_rslora else conf.alpha / rank
        check_scaling(scaling, f"module {path!r}: {conf.alpha_field} and rank {rank}")
        out[path] = (LowRankDelta(a=a.to(torch.float32), b=b.to(torch.float32) * scaling), extras)
    return out


def load_lora(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a LORA directory (without use_dora: the DoRA kind takes those).

    Modules adapted through target_parameters (experts and routers: their tensors nest under
    `.base_layer`, or target_modules does not name them) are normalized by parameters.py.
    """
    check_lora_family_config(config, parameters_served=True)
    by_module, by_parameter = split_parameter_tensors(config, tensors)
    deltas: dict[str, Delta] = {}
    if by_module or not by_parameter:
        modules = lora_modules(config, by_module, parameters_served=True)
        deltas = {path: delta for path, (delta, _) in modules.items()}
    for path, delta in parameter_deltas(config, by_parameter).items():
        if path in deltas:
            raise AdapterRejected(f"{path!r} is adapted twice (target_modules and target_parameters)")
        deltas[path] = delta
    return NormalizedAdapter(peft_type="LORA", kind="lora", deltas=deltas)
