"""Devices to parametrize tests over: the CPU always, CUDA as a `gpu` test that skips cleanly without one."""

from __future__ import annotations

import pytest
import torch

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
interpreted = pytest.mark.skipif(
    torch.cuda.is_available(), reason="Triton on CPU tensors: its interpreter, which is off with a GPU"
)
"""For tests that run the Triton kernels on CPU (their cuda variant runs them compiled)."""

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_cuda])]
"""For `@pytest.mark.parametrize("device", DEVICES)`."""

KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""Where the Triton kernels run: compiled on the GPU when there is one, else in the interpreter on CPU."""
