"""The paged KV cache: fixed pools of blocks, written through transformers' cache protocol."""

from __future__ import annotations

import math
import mmap

import torch


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes one token occupies in the cache across all layers (keys and values)."""
    return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def zeroed_pool(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor of zeros for a pool. On CPU it lies in a private anonymous mapping, whose pages the
    kernel hands over zeroed when first touched: the pool takes no time at start and no memory until its
    blocks are used. torch.zeros writes all of it at once: 0.1-1.0 s for the start-up benchmark's 512 MiB
    on the 2-vCPU Xeon VM, whose host takes freed memory back and faults it in again on first touch."""
    if device.type != "cpu" or not hasattr(mmap, "MAP_ANONYMOUS"):
        return torch.zeros(shape, dtype=dtype, device=device)
    count = math.prod(shape)
    mapping = mmap.mmap(-1, max(count * dtype.itemsize, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(mapping, dtype=dtype, count=count).view(shape)  # the tensor keeps the mapping


class PagedKVCache:
    """Key/value pools shared by all sequences, addressed by flat slot = block * block_size + offset.

    transformers' attention modules call ``update(k, v, layer_idx, kwargs=...)`` with the step's
    new keys and values; we scatter them into their slots and hand them back unchanged, because
    our attention function reads each sequence's context from the pools itself.

    One slot past the last block, ``null_slot``, is never allocated nor written: it holds zeros, and
    every padded or masked position of a batched attention reads it instead of a real slot. A masked
    position still enters the attention arithmetic (its weight is 0, and 0 x NaN is NaN), so it must
    never hold another sequence's values, nor what a finished sequence left in a freed block.
    The slot after it, ``scratch_slot``, takes the writes of a captured decode step's padding rows.
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.null_slot = num_blocks * block_size
        self.scratch_slot = self.null_slot + 1
        shape = (num_layers, self.null_slot + 2, num_kv_heads, head_dim)
        self.keys = zeroed_pool(shape, dtype, device)  # [L, slots, Hkv, D]
        self.values = zeroed_pool(shape, dtype, device)  # [L, slots, Hkv, D]
        self._scratch = torch.empty(0, dtype=dtype, device=device)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of `slots` [B, L] of one layer, each [B, L, Hkv, D].

        Both are views of one scratch buffer that every call reuses (valid until the next call): with a
        fresh allocation per layer and step, decode gathers took an erratic 4-21 ms on CPU (likely page
        faults), and index_select on flat slots is about 2x faster than advanced indexing. The buffer
        keeps the largest size a step needed.
        """
        flat = slots.reshape(-1)
        row = self.keys.shape[2:]  # (Hkv, D)
        needed = 2 * flat.numel() * row.numel()
        if self._scratch.numel() < needed:
            self._scratch = torch.empty(needed, dtype=self.keys.dtype, device=self.keys.device)
        k, v = self._scratch[:needed].view(2, flat.numel(), *row).unbind(0)
        torch.index_select(self.keys[layer], 0, flat, out=k)
        torch.index_select(self.values[layer], 0, flat, out=v)
        return k.view(*slots.shape, *row), v.view(*slots.shape, *row)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, kwargs: dict | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states, value_states: [1, Hkv, T, D]; slot_mapping: [T]
        slots = kwargs["peftserve_attn"].slot_mapping
        self.keys[layer_idx].index_copy_(0, slots, key_states[0].transpose(0, 1))
        self.values[layer_idx].index_copy_(0, slots, value_states[0].transpose(0, 1))
        return key_states, value_states

    def write_prefix(self, slots: torch.Tensor, prefix_kv: torch.Tensor) -> None:
        """Write virtual-token keys/values (prefix tuning) into a sequence's first slots.

        prefix_kv: [L, 2, Hkv, nvt, D]; slots: [nvt].
        """
        self.keys.index_copy_(1, slots, prefix_kv[:, 0].transpose(1, 2).to(self.keys.dtype))
        self.values.index_copy_(1, slots, prefix_kv[:, 1].transpose(1, 2).to(self.values.dtype))

    # transformers may ask these of any cache object; our positions are always explicit.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def __len__(self) -> int:
        return self.keys.shape[0]
