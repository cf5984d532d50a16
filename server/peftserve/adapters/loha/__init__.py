"""LoHa: a Hadamard product of two low-rank products, served from its factors where that is cheaper."""

from .loader import hadamard_delta, load_loha

__all__ = ["hadamard_delta", "load_loha"]
