"""AdaLoRA: served as per-module-rank LoRA (no kernels of its own)."""

from .loader import adalora_scaling, load_adalora

__all__ = ["adalora_scaling", "load_adalora"]
