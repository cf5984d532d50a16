"""LoRA: PEFT's LORA format as low-rank deltas."""

from .loader import check_lora_family_config, load_lora, lora_modules

__all__ = ["check_lora_family_config", "load_lora", "lora_modules"]
