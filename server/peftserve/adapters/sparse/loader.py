"""SHIRA directories -> per-module SparseDelta (the container for gradient-selected sparse deltas)."""

from __future__ import annotations

import torch

from peftserve.errors import AdapterRejected

from ..forms import SparseDelta
from ..normalized import NormalizedAdapter
from ..peft_format import Config, Tensors, module_tensors, reject_if_set, require


def load_shira(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a SHIRA directory.

    peft's SHiRA forward is F.linear(x, W + dW) with dW a COO matrix of (shira_indices, shira_weight *
    scaling) and scaling fixed at 1.0 (not saved), so the values are the delta as stored.
    """
    reject_if_set(config, "fan_in_fan_out", "SHiRA indices of transposed (Conv1D) weights are not served")
    modules = module_tensors(tensors, ("shira_weight", "shira_indices"))
    if not modules:
        raise AdapterRejected("adapter_model.safetensors holds no shira_weight/shira_indices tensors")
    deltas: dict[str, SparseDelta] = {}
    for path, params in sorted(modules.items()):
        values, indices = require(params, path, "shira_weight", "shira_indices")  # [k], [2, k]
        if values.dim() != 1 or indices.dim() != 2 or indices.shape != (2, values.shape[0]):
            raise AdapterRejected(
                f"module {path!r}: shira_indices {tuple(indices.shape)} and shira_weight "
                f"{tuple(values.shape)} do not form (2, k), (k,)"
            )
        if values.shape[0] == 0:
            raise AdapterRejected(f"module {path!r}: shira_weight has no entries (rank 0)")
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise AdapterRejected(f"module {path!r}: shira_indices must be integers, got {indices.dtype}")
        rows, cols = indices.to(torch.int64)  # [k], [k]
        deltas[path] = SparseDelta(rows=rows.contiguous(), cols=cols.contiguous(), values=values.float())
    return NormalizedAdapter(peft_type="SHIRA", kind="sparse", deltas=deltas)
