"""VERA directories -> per-module vectors over the adapter's shared frozen projections.

peft computes y = base(x) + lambda_b * ((lambda_d * (x @ A[:, :in].T)) @ B[:out].T), with A [r, max_in]
and B [max_out, r] random, frozen and shared by every module (saved once, as base_model.vera_A/_B).
"""

from __future__ import annotations

import hashlib

import torch

from peftserve.errors import AdapterRejected

from ..forms import Delta, ProjectedDelta
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors, module_tensors, positive_int, require

PROJECTIONS = ("base_model.vera_A", "base_model.vera_B")
PARAMS = ("vera_lambda_d", "vera_lambda_b")


def projection_key(a: torch.Tensor, b: torch.Tensor) -> str:
    """sha256 of both projections' float32 bytes: equal projections share one device copy."""
    digest = hashlib.sha256()
    for t in (a, b):
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def load_vera(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a VERA directory saved with its projections (save_projection=True, peft's default)."""
    if config.get("save_projection", True) is not True:
        raise AdapterRejected(
            f"save_projection={config.get('save_projection')!r}: the projections would have to be "
            "regenerated from projection_prng_key, which peft does not promise to reproduce across "
            "platforms; save the adapter with save_projection=True"
        )
    bias = config.get("bias", "none")
    if bias != "none":
        raise AdapterRejected(f"bias={bias!r}: trained base biases are not served (only bias='none')")
    rest = dict(tensors)
    missing = [name for name in PROJECTIONS if name not in rest]
    if missing:
        raise AdapterRejected(f"tensor {missing[0]!r} is missing (the shared projection of every module)")
    vera_a, vera_b = (rest.pop(name).to(torch.float32) for name in PROJECTIONS)  # [r, max_in], [max_out, r]
    r = positive_int(config, "r", 256)
    if vera_a.dim() != 2 or vera_b.dim() != 2 or vera_a.shape[0] != r or vera_b.shape[1] != r:
        raise AdapterRejected(
            f"vera_A {tuple(vera_a.shape)} and vera_B {tuple(vera_b.shape)} do not form (r, max_in), "
            f"(max_out, r) with r={r}"
        )
    key = projection_key(vera_a, vera_b)
    modules = module_tensors(rest, PARAMS)
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no vera_lambda_d/vera_lambda_b tensors")
    deltas: dict[str, Delta] = {}
    for path, params in sorted(modules.items()):
        lambda_d, lambda_b = (t.to(torch.float32) for t in require(params, path, *PARAMS))
        if lambda_d.shape != (r,) or lambda_b.dim() != 1:
            raise AdapterRejected(
                f"module {path!r}: vera_lambda_d {tuple(lambda_d.shape)} and vera_lambda_b "
                f"{tuple(lambda_b.shape)} do not form (r,), (out,) with r={r}"
            )
        deltas[path] = ProjectedDelta(
            lambda_d=lambda_d, lambda_b=lambda_b, vera_a=vera_a, vera_b=vera_b, key=key
        )
    return NormalizedAdapter(peft_type="VERA", kind="vera", deltas=deltas)
