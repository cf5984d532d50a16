"""IA³: learned vectors scaling a module's input (feedforward modules) or output."""

from .loader import load_ia3, scales_input

__all__ = ["load_ia3", "scales_input"]
