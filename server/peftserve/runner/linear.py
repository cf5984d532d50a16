"""Faster dense layers on CPU: the model's Linear layers run oneDNN on weights packed once at start.

torch sends a float32 `F.linear` on CPU to MKL's sgemm, which is slow on the skinny shapes of serving
(decode steps multiply 4-64 rows by each weight). oneDNN on a weight reordered once into its blocked
layout is 1.1-3.6x faster there and never slower from 4 rows up (benchmarks/bench_linear.py on the
2-core dev box, one thread, bench-1b shapes: gate_proj at 32 rows 55 -> 87 GFLOP/s, lm_head at 32 rows
43 -> 96). At 1 row neither wins (0.8-1.5x), so rows below MIN_ROWS keep F.linear on the plain
weight: packing costs one more copy of every Linear weight in host memory (`--cpu-linear torch`
turns it off).

The ops are the ones inductor's CPU weight prepacking uses (torch.ops.mkldnn._reorder_linear_weight and
_linear_pointwise): private to torch, hence a probe against F.linear at start and the fallback to plain
torch wherever it fails, and torch's upper bound in pyproject.toml.
"""

from __future__ import annotations

import logging
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

MIN_ROWS = 4
"""Fewer rows than this go to F.linear on the plain weight (oneDNN's blocked layout gains nothing there)."""
DTYPES = (torch.float32, torch.bfloat16)


def pack(weight: torch.Tensor) -> torch.Tensor:
    """weight [out, in] reordered into oneDNN's blocked layout (an opaque tensor for packed_linear)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) on the packed weight: x [..., in] -> [..., out]."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@cache
def onednn_usable(dtype: torch.dtype) -> bool:
    """Whether packed oneDNN linears exist in this torch and agree with F.linear on a probe (once)."""
    if dtype not in DTYPES or not torch.backends.mkldnn.is_available():
        return False
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 40, generator=gen).to(dtype)
    bias = torch.randn(24, generator=gen).to(dtype)
    x = torch.randn(2, 5, 40, generator=gen).to(dtype)
    try:
        with torch.inference_mode():
            got = packed_linear(x, pack(weight), bias)
    except (AttributeError, RuntimeError) as exc:  # AttributeError: a torch without these ops
        log.warning("oneDNN linear unavailable (%s); using torch's", exc)
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2
    return got.shape == (2, 5, 24) and torch.allclose(got, F.linear(x, weight, bias), atol=tolerance, rtol=0)


class PackedLinear(nn.Linear):
    """An nn.Linear that runs oneDNN on its weight packed once; it shares the weight and bias of the
    Linear it replaces (shape checks, adapter wrapping, autograd and small batches use them)."""

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        with torch.inference_mode():
            self.packed = pack(linear.weight)  # opaque, not in the state dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < MIN_ROWS or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, onednn_packed=True"


def pack_linears(model: nn.Module) -> int:
    """Replace every CPU nn.Linear of the model in `DTYPES` by a PackedLinear; how many were replaced.

    Weights must not be changed afterwards: the packed copy would not follow.
    """
    targets = [
        (path, module)
        for path, module in model.named_modules()
        if type(module) is nn.Linear
        and module.weight.device.type == "cpu"
        and onednn_usable(module.weight.dtype)
    ]
    for path, module in targets:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, name, PackedLinear(module))
    return len(targets)
