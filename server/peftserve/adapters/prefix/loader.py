"""PREFIX_TUNING directories -> per-layer K/V for the first KV blocks of a request."""

from __future__ import annotations

import torch

from peftserve.errors import AdapterRejected

from ..normalized import NormalizedAdapter, PrefixKV
from ..peft_format import Config, Tensors, positive_int

EMBEDDINGS_KEY = "prompt_embeddings"


def prefix_kv_from_embeddings(embeddings: torch.Tensor, num_layers: int, kv_heads: int) -> torch.Tensor:
    """[nvt, L*2*kv_heads*head_dim] -> [L, 2, kv_heads, nvt, head_dim], peft's get_prompt layout.

    peft views the embeddings as [nvt, L*2, kv_heads, head_dim]; entry 2l is layer l's keys and
    2l+1 its values, used as-is (already post-RoPE).
    """
    nvt, width = embeddings.shape
    head_dim = width // (num_layers * 2 * kv_heads)
    kv = embeddings.view(nvt, num_layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)  # [L*2, kv, nvt, hd]
    return kv.reshape(num_layers, 2, kv_heads, nvt, head_dim).contiguous()


def load_prefix(config: Config, tensors: Tensors) -> NormalizedAdapter:
    """Normalize a PREFIX_TUNING directory (decoder-only: one transformer submodule).

    The saved prompt_embeddings already went through the projection MLP when prefix_projection is set,
    so both settings load the same way.
    """
    submodules = config.get("num_transformer_submodules", 1)
    if submodules not in (1, None):
        raise AdapterRejected(
            f"num_transformer_submodules={submodules!r}: only decoder-only prefixes (1) are served"
        )
    nvt = positive_int(config, "num_virtual_tokens")
    num_layers = positive_int(config, "num_layers")
    kv_heads = positive_int(config, "num_attention_heads")
    token_dim = positive_int(config, "token_dim")
    if token_dim % kv_heads:
        raise AdapterRejected(f"token_dim={token_dim} is not a multiple of num_attention_heads={kv_heads}")
    extra = sorted(set(tensors) - {EMBEDDINGS_KEY})
    if extra:
        raise AdapterRejected(
            f"tensor {extra[0]!r} is not served (a prefix adapter holds only {EMBEDDINGS_KEY})"
        )
    if EMBEDDINGS_KEY not in tensors:
        raise AdapterRejected(f"{EMBEDDINGS_KEY} is missing")
    embeddings = tensors[EMBEDDINGS_KEY]  # [nvt, L*2*token_dim]
    expected = (nvt, num_layers * 2 * token_dim)
    if tuple(embeddings.shape) != expected:
        raise AdapterRejected(
            f"{EMBEDDINGS_KEY} has shape {tuple(embeddings.shape)}, expected {expected} from "
            "num_virtual_tokens, num_layers and token_dim"
        )
    kv = prefix_kv_from_embeddings(embeddings.to(torch.float32), num_layers, kv_heads)
    return NormalizedAdapter(peft_type="PREFIX_TUNING", kind="prefix", prefix=PrefixKV(kv=kv))
