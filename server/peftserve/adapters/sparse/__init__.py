"""Gradient-selected sparse deltas, stored in PEFT's SHIRA format."""

from .loader import load_shira

__all__ = ["load_shira"]
