"""LoRA: loading PEFT's LORA format and the low-rank delta kernels."""

from .kernels import lora_grouped, lora_reference
from .loader import check_lora_family_config, load_lora

__all__ = ["check_lora_family_config", "load_lora", "lora_grouped", "lora_reference"]
