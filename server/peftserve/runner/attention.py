"""Ragged paged attention, registered with transformers' AttentionInterface.

The runner packs every token of a step into one ``[1, T]`` batch. Each sequence contributes a
contiguous run of query tokens; its keys and values live in the paged pools of ``PagedKVCache``
(written by ``cache.update`` just before this function runs).

With attention in place every token reads its own sequence's blocks straight from the pool, in one
call per layer: our C++ kernel (``--attention cpp``, runner/paged_kernel.py) or torch's flex attention
compiled (``flex``, runner/flex.py). Otherwise (``sdpa``), and in layers
with attention sinks (GPT-OSS), decode rows are gathered into a padded buffer and attended together
in one call, prefill chunks one call each, on torch's SDPA. Attention-logit soft-capping (Gemma 2)
and sinks are not expressible in SDPA: there layers that pass ``softcap`` or ``s_aux`` take
``explicit_attention`` instead, so only those models pay for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from peftserve.runner.flex import PagedLayout
from peftserve.runner.kv_cache import PagedKVCache

ATTENTION_NAME = "peftserve_paged"


@dataclass
class PrefillChunk:
    """One sequence's run of query tokens that is not a single decode token."""

    q_start: int
    """Index of the chunk's first token in the packed batch."""
    q_len: int
    ctx_len: int
    """Keys the chunk attends to, itself included (prefix virtual tokens count)."""
    slots: torch.Tensor | None
    """[ctx_len] pool slots of the whole context; None when the context is exactly this chunk."""


@dataclass
class AttentionMetadata:
    """Built once per step by the runner; read by every layer's attention and cache update."""

    cache: PagedKVCache
    slot_mapping: torch.Tensor
    """[T] pool slot where each packed token's key/value is written."""
    decode_token_idx: torch.Tensor | None
    """[Bd] packed index of each decode row's query token."""
    decode_slots: torch.Tensor | None
    """[Bd, Lmax] pool slots of each decode row's context; positions past it hold the cache's null slot."""
    decode_ctx_lens: torch.Tensor | None
    """[Bd] context length of each decode row."""
    prefills: list[PrefillChunk]
    paged: PagedLayout | None = None
    """Set when attention reads the pools in place; layers with sinks still take the paths below."""
    attend: Callable[..., torch.Tensor] | None = None
    """What reads the pools in place with `paged` (set with it): kernel_paged_attention
    (runner/paged_kernel.py) or flex_paged_attention, which share a signature."""
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[Bd, 1, 1, Lmax] True where a decode row may attend (causal, optional sliding window)."""
        key = ("decode", window)
        if key not in self._masks:
            lmax = self.decode_slots.shape[1]
            j = torch.arange(lmax, device=self.decode_slots.device)[None, :]  # [1, Lmax]
            ctx = self.decode_ctx_lens[:, None]  # [Bd, 1]
            mask = j < ctx
            if window is not None:
                mask &= j > ctx - 1 - window
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None, explicit: bool = False) -> torch.Tensor | None:
        """[q_len, ctx_len] mask of prefill chunk i; None when SDPA's is_causal is exact (unless explicit)."""
        chunk = self.prefills[i]
        if not explicit and chunk.slots is None and (window is None or chunk.ctx_len <= window):
            return None
        key = ("prefill", i, window)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(chunk.ctx_len - chunk.q_len, chunk.ctx_len, device=device)[:, None]
            k_pos = torch.arange(chunk.ctx_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[key] = mask
        return self._masks[key]


EXPLICIT_TILE_ELEMENTS = 1 << 24
"""Score entries (fp32: 64 MiB) the explicit path materializes at once; longer prefills go by query tiles."""


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scaling: float,
    softcap: float | None,
    sinks: torch.Tensor | None,
) -> torch.Tensor:
    """Attention with the score transforms SDPA lacks, computed as transformers' eager attention does.

    Semantics: ``s = q·kᵀ · scaling``; with softcap, ``s = softcap · tanh(s / softcap)``; masked
    entries get -inf; with sinks (one logit per query head), ``p = softmax([s, sink])[:-1]``, else
    ``p = softmax(s)``; ``out = p · v``. Softmax runs in fp32.
    q: [B, Hq, n, D]; k, v: [B, Hkv, L, D]; mask: bool, broadcastable to [B, 1, n, L]. Returns [B, Hq, n, D].
    Query head h reads key/value head h // (Hq / Hkv), as repeat_kv does.
    """
    batch, num_heads, n, head_dim = q.shape
    kv_heads, length = k.shape[1], k.shape[2]
    groups = num_heads // kv_heads
    qg = q.reshape(batch, kv_heads, groups * n, head_dim)  # [B, Hkv, G*n, D]
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scaling)  # [B, Hkv, G*n, L]
    scores = scores.view(batch, num_heads, n, length)  # [B, Hq, n, L]
    if softcap is not None:
        scores = scores.div_(softcap).tanh_().mul_(softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        sink = sinks.to(scores.dtype).view(1, num_heads, 1, 1).expand(batch, num_heads, n, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
    probs = probs.to(v.dtype).view(batch, kv_heads, groups * n, length)
    return torch.matmul(probs, v).view(batch, num_heads, n, head_dim)


def _explicit_tiled(q, k, v, mask, scaling, softcap, sinks) -> torch.Tensor:
    """explicit_attention over query tiles, so a long prefill chunk never holds all its scores at once.

    q: [1, Hq, n, D]; mask: [n, L]. Returns [1, Hq, n, D].
    """
    n, length = q.shape[2], k.shape[2]
    tile = max(1, EXPLICIT_TILE_ELEMENTS // (q.shape[1] * length))
    if tile >= n:
        return explicit_attention(q, k, v, mask, scaling, softcap, sinks)
    parts = [
        explicit_attention(q[:, :, s : s + tile], k, v, mask[s : s + tile], scaling, softcap, sinks)
        for s in range(0, n, tile)
    ]
    return torch.cat(parts, dim=2)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over packed ragged sequences whose context lives in the paged pools.

    Semantics: for every packed query token t of sequence s at KV index p,
    ``out[t] = softmax(q[t] · K_s[:p+1]ᵀ · scaling) · V_s[:p+1]`` (restricted to the last
    ``sliding_window`` keys when the model has one), with K_s, V_s the sequence's cached keys
    and values (prefix-tuning virtual tokens first).
    query: [1, Hq, T, D]; key, value: [1, Hkv, T, D] (this step's new tokens, already cached).
    Returns [1, T, Hq, D].
    """
    meta: AttentionMetadata = kwargs["peftserve_attn"]
    layer = module.layer_idx
    num_heads, num_tokens, head_dim = query.shape[1], query.shape[2], query.shape[3]
    if scaling is None:
        scaling = head_dim**-0.5
    if meta.paged is not None and s_aux is None:
        keys, values = meta.cache.keys[layer], meta.cache.values[layer]
        return meta.attend(query, keys, values, meta.paged, scaling, sliding_window, softcap), None
    gqa = num_heads != key.shape[1]
    explicit = softcap is not None or s_aux is not None
    out = query.new_empty(num_tokens, num_heads, head_dim)  # [T, Hq, D]

    if meta.decode_token_idx is not None:
        q = query[0].index_select(1, meta.decode_token_idx).transpose(0, 1)[:, :, None]  # [Bd, Hq, 1, D]
        k, v = meta.cache.gather(layer, meta.decode_slots)  # [Bd, Lmax, Hkv, D] each
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [Bd, Hkv, Lmax, D]
        mask = meta.decode_mask(sliding_window)  # [Bd, 1, 1, Lmax]
        if explicit:
            o = explicit_attention(q, k, v, mask, scaling, softcap, s_aux)  # [Bd, Hq, 1, D]
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa)
        out.index_copy_(0, meta.decode_token_idx, o[:, :, 0])

    for i, chunk in enumerate(meta.prefills):
        end = chunk.q_start + chunk.q_len
        q = query[:, :, chunk.q_start : end]  # [1, Hq, q_len, D]
        if chunk.slots is None:
            k = key[:, :, chunk.q_start : end]  # [1, Hkv, q_len, D]
            v = value[:, :, chunk.q_start : end]
        else:
            k, v = meta.cache.gather(layer, chunk.slots)  # [ctx, Hkv, D] each
            k, v = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        mask = meta.prefill_mask(i, sliding_window, explicit)
        if explicit:
            o = _explicit_tiled(q, k, v, mask, scaling, softcap, s_aux)  # [1, Hq, q_len, D]
        else:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scaling, enable_gqa=gqa
            )  # [1, Hq, q_len, D]
        out[chunk.q_start : end] = o[0].transpose(0, 1)

    return out[None], None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
