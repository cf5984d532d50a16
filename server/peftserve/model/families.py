"""The model families peftserve serves, and for any other one the nearest family that is served.

A family is a transformers `model_type`. It is served when its modeling code reaches the server only
through the attention interface and the cache protocol the runner drives (DESIGN.md, decision 1) and
its outputs equal transformers' and PEFT's own with every adapter kind; tests/engine/test_families.py
checks each one, and the README's support matrix is rendered from those tests.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

from peftserve.errors import InvalidRequest


@dataclass(frozen=True)
class Family:
    """A served model family and what its attention and MLP bring beyond Llama's."""

    model_type: str
    name: str
    """How people write it, e.g. 'Gemma 2'."""
    traits: tuple[str, ...] = ()
    """What it brings beyond a Llama block (each exercised by the family's tiny test model)."""

    @property
    def moe(self) -> bool:
        return "mixture of experts" in self.traits


SLIDING = "sliding-window layers"
SOFTCAP = "attention and final logit soft-capping"
FINAL_SOFTCAP = "final logit soft-capping"
SINKS = "attention sinks"
QUERY_SCALAR = "query_pre_attn_scalar"
MOE = "mixture of experts"
QK_NORM = "query/key norms"

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama"),
        Family("mistral", "Mistral"),
        Family("qwen2", "Qwen2"),
        Family("qwen3", "Qwen3", (QK_NORM,)),
        Family("gpt2", "GPT-2"),
        Family("gemma", "Gemma"),
        Family("gemma2", "Gemma 2", (SLIDING, SOFTCAP, QUERY_SCALAR)),
        Family("gemma3_text", "Gemma 3 (text)", (SLIDING, FINAL_SOFTCAP, QUERY_SCALAR, QK_NORM)),
        Family("phi3", "Phi-3"),
        Family("starcoder2", "StarCoder2"),
        Family("olmo", "OLMo"),
        Family("olmo2", "OLMo 2", (QK_NORM,)),
        Family("olmo3", "OLMo 3", (SLIDING, QK_NORM)),
        Family("granite", "Granite"),
        Family("mixtral", "Mixtral", (MOE,)),
        Family("qwen3_moe", "Qwen3-MoE", (QK_NORM, MOE)),
        Family("gpt_oss", "GPT-OSS", (SLIDING, SINKS, MOE)),
    )
}
"""Every served family, by model_type."""

RELATIVES: dict[str, tuple[str, str]] = {
    "gemma3": (
        "gemma3_text",
        "this Gemma 3 checkpoint carries a vision tower (Gemma3ForConditionalGeneration); peftserve serves "
        "text-only Gemma 3 checkpoints (model_type 'gemma3_text', e.g. gemma-3-1b)",
    ),
    "qwen2_moe": ("qwen3_moe", "Qwen2-MoE adds shared experts with their own gate, which are not verified"),
    "olmoe": ("qwen3_moe", "OLMoE's experts are not verified"),
    "gpt_neox": (
        "llama",
        "GPT-NeoX calls its cache without the keyword arguments that carry the paged-attention metadata",
    ),
    "falcon": ("llama", "Falcon does not use transformers' attention interface"),
    "bloom": ("llama", "BLOOM does not use transformers' attention interface"),
    "mpt": ("llama", "MPT does not use transformers' attention interface"),
    "deepseek_v3": ("mixtral", "DeepSeek-V3's latent attention and shared experts are not verified"),
}
"""Unserved families people ask for: (nearest served family, why it is not served)."""

FALLBACK = "llama"
"""The nearest family when nothing relates: the plainest decoder, which most others extend."""


def nearest_family(model_type: str, config: Mapping[str, object]) -> tuple[str, str]:
    """(nearest served model_type, why `model_type` is not served) for an unserved family.

    Known relatives first; then a mixture-of-experts config maps to the closest-named MoE family and any
    other to the closest name among the dense ones; the plainest decoder when no name is close.
    """
    if model_type in RELATIVES:
        return RELATIVES[model_type]
    is_moe = any(config.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts"))
    pool = [f.model_type for f in FAMILIES.values() if f.moe == is_moe]
    close = difflib.get_close_matches(model_type, pool, n=1, cutoff=0.7)
    default = "mixtral" if is_moe else FALLBACK
    return (close[0] if close else default), "its modeling code is not verified with peftserve"


def check_config(config: Mapping[str, object]) -> Family:
    """The served family of a config.json's contents; InvalidRequest naming the nearest one otherwise."""
    model_type = config.get("model_type")
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        nearest, why = nearest_family(str(model_type), config)
        raise InvalidRequest(
            f"model family {model_type!r} is not supported ({why}); the nearest supported family is "
            f"{nearest!r} ({FAMILIES[nearest].name}). Supported: {', '.join(FAMILIES)}"
        )
    quantization = config.get("quantization_config")
    if quantization:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
        raise InvalidRequest(
            f"this {family.name} checkpoint is quantized (quantization_config: {method!r}); peftserve serves "
            "unquantized weights: save the model dequantized first (transformers: from_pretrained with the "
            "quantization config's dequantize=True, then save_pretrained)"
        )
    if config.get("use_bidirectional_attention"):
        raise InvalidRequest(
            f"this {family.name} checkpoint sets use_bidirectional_attention (an embedding model, not a "
            "causal language model); only causal models are served"
        )
    return family
