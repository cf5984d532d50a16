"""LOHA directories -> dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r on Linear modules.

The Hadamard product of two rank-r products has rank at most r1 * r2 and factors exactly:
    dW = B' @ A',  B'[o, (j, k)] = w1_a[o, j] * w2_a[o, k],  A'[(j, k), i] = w1_b[j, i] * w2_b[k, i],
so a module is served as a rank r1 * r2 low-rank delta when that holds fewer entries than dW itself
(r1 * r2 * (out + in) < out * in), else as the dense dW; the slot's size says which.
"""

from __future__ import annotations

import torch

from peftserve.errors import AdapterRejected

from ..forms import Delta, DenseDelta, LowRankDelta
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors, check_scaling, module_tensors, rank_and_alpha, require

PARAMS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def hadamard_delta(
    w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float, origin: str
) -> Delta:
    """The cheaper exact form of (w1a @ w1b) * (w2a @ w2b) * scale: low rank r1 * r2, or dense."""
    out_features, r1 = w1a.shape
    r2, in_features = w2b.shape
    if r1 * r2 * (out_features + in_features) < out_features * in_features:
        b = (w1a[:, :, None] * w2a[:, None, :]).reshape(out_features, r1 * r2) * scale  # [out, r1*r2]
        a = (w1b[:, None, :] * w2b[None, :, :]).reshape(r1 * r2, in_features)  # [r1*r2, in]
        return LowRankDelta(a=a, b=b, origin=f"{origin} as rank r1 * r2")
    return DenseDelta(weight=(w1a @ w1b) * (w2a @ w2b) * scale, origin=f"{origin} (denser as factors)")


def load_loha(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a LOHA directory (Linear targets; peft's LoHa has no Conv1D layer)."""
    modules = module_tensors(tensors, PARAMS)
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no hada_w1_a/hada_w1_b/hada_w2_a/hada_w2_b")
    deltas: dict[str, Delta] = {}
    for path, params in sorted(modules.items()):
        w1a, w1b, w2a, w2b = (t.to(torch.float32) for t in require(params, path, *PARAMS))
        shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(PARAMS, (w1a, w1b, w2a, w2b), strict=True))
        if any(t.dim() != 2 for t in (w1a, w1b, w2a, w2b)) or not (
            w1a.shape[1] == w1b.shape[0]
            and w2a.shape[1] == w2b.shape[0]
            and w1a.shape[0] == w2a.shape[0]
            and w1b.shape[1] == w2b.shape[1]
        ):
            raise AdapterRejected(f"module {path!r}: {shapes} do not form (out, r), (r, in) twice")
        conf = rank_and_alpha(config, path, 8, "alpha", 8)
        if {w1a.shape[1], w2a.shape[1]} != {conf.r}:
            raise AdapterRejected(f"module {path!r}: {conf.r_field}={conf.r} but the factors are {shapes}")
        scale = check_scaling(conf.alpha / conf.r, f"module {path!r}: {conf.alpha_field} and rank {conf.r}")
        deltas[path] = hadamard_delta(w1a, w1b, w2a, w2b, scale, f"LoHa r={conf.r}")
    return NormalizedAdapter(peft_type="LOHA", kind="loha", deltas=deltas)
