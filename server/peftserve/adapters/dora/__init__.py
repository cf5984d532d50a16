"""DoRA: LoRA with a learned magnitude per output feature (LORA directories saved with use_dora)."""

from .loader import DoraDelta, load_dora, uses_dora

__all__ = ["DoraDelta", "load_dora", "uses_dora"]
