"""The KV pools' memory: zeros from the start, taken from the system only as blocks are written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from peftserve.runner.kv_cache import PagedKVCache


def _resident_mb() -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def test_a_cpu_pool_is_zeros_that_take_memory_only_where_written() -> None:
    before = _resident_mb()
    cache = PagedKVCache(
        num_layers=4, num_blocks=4096, block_size=16, num_kv_heads=4, head_dim=64,
        dtype=torch.bfloat16, device=torch.device("cpu"),
    )  # fmt: skip
    pools_mb = 2 * cache.keys.numel() * cache.keys.element_size() / 2**20  # 256 MiB
    assert _resident_mb() - before < pools_mb / 8
    slots = torch.arange(16, 32)  # block 1
    keys = torch.randn(1, 4, 16, 64, dtype=torch.bfloat16)
    meta = type("Meta", (), {"slot_mapping": slots})()
    cache.update(keys, -keys, layer_idx=2, kwargs={"peftserve_attn": meta})
    assert _resident_mb() - before < pools_mb / 8  # a block's pages
    assert torch.equal(cache.keys[2, slots], keys[0].transpose(0, 1))
    assert torch.equal(cache.values[2, slots], -keys[0].transpose(0, 1))
    written = torch.zeros(cache.keys.shape[1], dtype=torch.bool)
    written[slots] = True
    for pool in (cache.keys, cache.values):  # all else, the null slot with it, reads zeros
        assert not pool[:2].any() and not pool[3:].any() and not pool[2, ~written].any()
