"""ADALORA directories -> per-module-rank LoRA: A' = A * E, B' = B * scaling, pruned modules dropped."""

from __future__ import annotations

import torch

from peftserve.errors import AdapterRejected

from ..forms import LowRankDelta
from ..lora import check_lora_family_config
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors, check_scaling, finite_number, module_tensors, positive_int, require

RANKNUM_EPS = 1e-5
"""peft's SVDLinear divides by (ranknum + 1e-5)."""


def adalora_scaling(config: Config) -> float:
    """peft computes x @ (A*E).T @ B.T * scaling / (ranknum + 1e-5).

    scaling is lora_alpha (or init_r when lora_alpha <= 0) and ranknum, not saved, is init_r after a
    reload (pruning removes rows but keeps ranknum), so every module shares one factor.
    """
    init_r = positive_int(config, "init_r", 12)
    alpha = finite_number(config, "lora_alpha", 8)
    scaling = alpha if alpha > 0 else float(init_r)
    return check_scaling(scaling / (init_r + RANKNUM_EPS), "lora_alpha and init_r")


def load_adalora(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize an ADALORA directory (tensors lora_A [r_i, in], lora_E [r_i, 1], lora_B [out, r_i])."""
    check_lora_family_config(config)
    factor = adalora_scaling(config)
    modules = module_tensors(tensors, ("lora_A", "lora_E", "lora_B"))
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no lora_A/lora_E/lora_B tensors")
    deltas: dict[str, LowRankDelta] = {}
    for path, params in sorted(modules.items()):
        a, e, b = require(params, path, "lora_A", "lora_E", "lora_B")  # [r, in], [r, 1], [out, r]
        rank = a.shape[0] if a.dim() == 2 else -1
        if rank < 0 or e.shape != (rank, 1) or b.dim() != 2 or b.shape[1] != rank:
            raise AdapterRejected(
                f"module {path!r}: lora_A {tuple(a.shape)}, lora_E {tuple(e.shape)}, lora_B {tuple(b.shape)} "
                "do not form (r, in), (r, 1), (out, r)"
            )
        if rank == 0:
            continue  # fully pruned: peft computes nothing for it either
        deltas[path] = LowRankDelta(
            a=a.to(torch.float32) * e.to(torch.float32), b=b.to(torch.float32) * factor
        )
    if not deltas:
        raise AdapterRejected("every module was pruned to rank 0; the adapter is the base model")
    return NormalizedAdapter(peft_type="ADALORA", kind="adalora", deltas=deltas)
