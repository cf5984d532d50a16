"""Sparse deltas: loading PEFT's SHIRA format and the sparse delta kernels."""

from .kernels import sparse_grouped, sparse_reference
from .loader import load_shira

__all__ = ["load_shira", "sparse_grouped", "sparse_reference"]
