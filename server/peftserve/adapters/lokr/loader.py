"""LOKR directories -> dW = kron(w1, w2) * alpha / r on Linear modules.

w1 [a, c] and w2 [b, d] are stored whole or as low-rank products (lokr_w1_a @ lokr_w1_b, ...); the
products are taken once at load. A module is then served from the two factors (kron(w1, w2) @ x as
w1 @ X @ w2.T, X the input viewed as [c, d]) when that costs fewer multiply-adds per token than the
dense dW, else as the dense dW.
"""

from __future__ import annotations

import torch

from peftserve.errors import AdapterRejected

from ..forms import Delta, DenseDelta, KroneckerDelta, kron_cost
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors, check_scaling, module_tensors, rank_and_alpha

PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def _factor(params: dict[str, torch.Tensor], path: str, n: int, rank: int, rank_field: str) -> torch.Tensor:
    """lokr_w{n}, or lokr_w{n}_a @ lokr_w{n}_b (whose inner size must be the configured rank)."""
    whole, left, right = (params.get(f"lokr_w{n}{s}") for s in ("", "_a", "_b"))
    if whole is not None and left is None and right is None:
        if whole.dim() != 2:
            raise AdapterRejected(f"module {path!r}: lokr_w{n} has shape {tuple(whole.shape)}, not 2-D")
        return whole.to(torch.float32)
    if whole is None and left is not None and right is not None:
        if left.dim() != 2 or right.dim() != 2 or left.shape[1] != right.shape[0]:
            raise AdapterRejected(
                f"module {path!r}: lokr_w{n}_a {tuple(left.shape)} and lokr_w{n}_b {tuple(right.shape)} "
                "do not form (m, r), (r, k)"
            )
        if left.shape[1] != rank:
            raise AdapterRejected(
                f"module {path!r}: {rank_field}={rank} but lokr_w{n}_a has rank {left.shape[1]}"
            )
        return left.to(torch.float32) @ right.to(torch.float32)
    raise AdapterRejected(f"module {path!r}: expected lokr_w{n}, or lokr_w{n}_a and lokr_w{n}_b")


def load_lokr(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a LOKR directory (Linear targets; the Conv-only lokr_t2 is not served)."""
    modules = module_tensors(tensors, PARAMS)
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no lokr_w1/lokr_w2 tensors")
    deltas: dict[str, Delta] = {}
    for path, params in sorted(modules.items()):
        conf = rank_and_alpha(config, path, 8, "alpha", 8)
        w1 = _factor(params, path, 1, conf.r, conf.r_field)  # [a, c]
        w2 = _factor(params, path, 2, conf.r, conf.r_field)  # [b, d]
        scale = check_scaling(conf.alpha / conf.r, f"module {path!r}: {conf.alpha_field} and rank {conf.r}")
        (a, c), (b, d) = w1.shape, w2.shape
        if kron_cost((a, c), (b, d)) < a * b * c * d:
            deltas[path] = KroneckerDelta(w1=w1 * scale, w2=w2)
        else:
            deltas[path] = DenseDelta(
                weight=torch.kron(w1, w2) * scale, origin=f"LoKr r={conf.r} (denser as factors)"
            )
    return NormalizedAdapter(peft_type="LOKR", kind="lokr", deltas=deltas)
