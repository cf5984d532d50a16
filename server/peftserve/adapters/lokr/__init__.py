"""LoKr: a Kronecker product of two (possibly low-rank) factors, served from the factors."""

from .loader import load_lokr

__all__ = ["load_lokr"]
