"""Attention in place (flex over the paged pool) against the same references as the gathering path.

Every slot outside the sequences' contexts holds NaN, the null slot included: the kernel must read
nothing but each token's own entries, and the zeroed value rows past each sequence's end.
"""

from __future__ import annotations

import pytest
import torch

from peftserve.config import EngineConfig
from peftserve.errors import InvalidRequest
from peftserve.runner.flex import PagedLayout, unwritten_tails
from tests.runner.test_attention import (
    MIXED,
    SINKS,
    engine_generates_what_the_gathering_engine_does,
    run_case,
)


@pytest.mark.parametrize(
    "seqs",
    [
        [(0, 7), (9, 1), (5, 6), (13, 1), (0, 1), (3, 1)],
        [(1, 1), (30, 1), (17, 1)],  # only decode rows
        [(3, 1)],  # one token: run as two (flex.MIN_TOKENS)
        [(0, 4), (7, 1), (8, 8)],  # contexts ending on a block boundary
    ],
)
def test_decode_rows_fresh_prefills_and_chunks_with_context(seqs):
    run_case(seqs, in_place="flex")


@pytest.mark.parametrize("window", [1, 4, 6])
def test_sliding_window(window):
    run_case(MIXED, window=window, in_place="flex")


@pytest.mark.parametrize("window", [None, 4])
def test_soft_capping(window):
    run_case(MIXED, window=window, softcap=1.5, in_place="flex")


def test_layers_with_sinks_keep_the_gathering_path():
    run_case(MIXED, window=5, softcap=2.0, sinks=SINKS, in_place="flex")


def test_layout_lists_only_each_tokens_own_blocks():
    """Token blocks: the full ones unmasked, at most two masked (window start, own block)."""
    chunks = [(0, 3, [0]), (9, 1, [7, 1, 4])]  # block size 4: tokens at 0-2 and one at 9
    layout = PagedLayout.build(chunks, 4, pool_slots=8 * 4 + 1, device=torch.device("cpu"))
    assert layout.block_pos[[0, 7, 1, 4]].tolist() == [0, 0, 1, 2]  # the short table's padding owns nothing
    first, (kv_num, kv_idx, full_num, full_idx) = layout.visible(window=None)
    assert first.tolist() == [0, 0, 0, 0]
    assert kv_num[0, 0].tolist() == [1, 1, 1, 1] and full_num[0, 0].tolist() == [0, 0, 0, 2]
    assert kv_idx[0, 0, :, 0].tolist() == [0, 0, 0, 4]
    assert full_idx[0, 0, 3, :2].tolist() == [7, 1]
    first, (kv_num, kv_idx, full_num, full_idx) = layout.visible(window=6)  # token 9 sees 4..9
    assert first[3] == 4 and full_num[0, 0, 3] == 1 and full_idx[0, 0, 3, 0] == 1  # block 1 whole
    assert kv_num[0, 0, 3] == 1 and kv_idx[0, 0, 3, 0] == 4  # block 4 in part
    assert unwritten_tails(chunks, 4) == [3, 4 * 4 + 2, 4 * 4 + 3]
    lone = PagedLayout.build([(9, 1, [7, 1, 4])], 4, pool_slots=8 * 4 + 1, device=torch.device("cpu"))
    assert lone.token_pos.tolist() == [9, 0] and lone.token_row.tolist() == [0, 0]  # its companion: 1 block
    _, (kv_num, kv_idx, full_num, _) = lone.visible(window=None)
    assert kv_num[0, 0, 1] == 1 and kv_idx[0, 0, 1, 0] == 7 and full_num[0, 0, 1] == 0


@pytest.mark.parametrize("family", ["llama", pytest.param("gemma2", marks=pytest.mark.slow)])
def test_an_engine_in_place_generates_what_the_gathering_engine_does(family):
    engine_generates_what_the_gathering_engine_does(family, "flex")


def test_unknown_attention_is_rejected():
    with pytest.raises(InvalidRequest, match="attention must be one of cpp, flex, sdpa"):
        EngineConfig(attention="eager")
