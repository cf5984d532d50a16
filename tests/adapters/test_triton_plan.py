"""The Triton kernels' step plan (plain torch): groups by signature, tiles, fixed-capacity padding."""

from __future__ import annotations

import pytest

from peftserve.adapters.triton.plan import Capacity, build_plan


def _tiles(plan) -> list[tuple[int, int, int, int]]:
    t = plan.tiles.view(4, plan.num_tiles).T.tolist()
    return [tuple(row) for row in t]


def test_tokens_grouped_by_signature() -> None:
    spans = [
        (0, 3, ((1, 1.0),)),
        (3, 1, ((2, 1.0),)),
        (4, 2, ((1, 1.0),)),  # slot 1 again: the same group as tokens 0-2
        (6, 2, ((1, 0.5),)),  # slot 1 at another weight: a group of its own
        (8, 1, ((1, 0.5), (2, 2.0))),
    ]
    plan = build_plan(spans, "cpu")
    assert plan.tokens.tolist() == [0, 1, 2, 4, 5, 3, 6, 7, 8]
    assert plan.block_m == 16 and plan.num_groups == 4 and plan.max_pairs == 2
    groups = plan.groups.view(2, plan.num_groups).tolist()
    assert groups == [[0, 1, 2, 3], [1, 1, 1, 2]]  # first pair, number of pairs
    pairs = plan.pairs.view(2, plan.num_pairs).tolist()
    assert pairs[0] == [1, 2, 1, 1, 2]  # slots
    assert pairs[1] == [0, 5, 6, 8, 9]  # first h row: one row per (group, pair, token)
    assert plan.weights.tolist() == [1.0, 1.0, 0.5, 0.5, 2.0] and plan.h_rows == 10
    assert _tiles(plan) == [(0, 5, 0, 0), (5, 1, 1, 0), (6, 2, 2, 0), (8, 1, 3, 0)]


def test_large_groups_get_taller_tiles_then_several() -> None:
    assert build_plan([(0, 30, ((0, 1.0),))], "cpu").block_m == 32
    plan = build_plan([(0, 150, ((0, 1.0),)), (150, 1, ((1, 1.0),))], "cpu")
    assert plan.block_m == 64
    assert _tiles(plan) == [(0, 64, 0, 0), (64, 64, 0, 64), (128, 22, 0, 128), (150, 1, 1, 0)]


def test_empty_step() -> None:
    plan = build_plan([], "cpu")
    assert plan.num_tiles == plan.num_tokens == plan.h_rows == 0


def test_capacity_pads_to_one_layout() -> None:
    capacity = Capacity(tokens=8, pairs_per_token=2, rank=64)
    small = build_plan([(0, 1, ((3, 1.0),))], "cpu", capacity)
    full = build_plan([(t, 1, ((t, 1.0), (7, 0.5))) for t in range(8)], "cpu", capacity)
    assert small.data.shape == full.data.shape
    for plan in (small, full):
        assert (plan.num_tiles, plan.num_pairs, plan.h_rows, plan.max_pairs) == (8, 16, 16, 2)
        assert plan.block_m == 16 and plan.rank_capacity == 64
    assert _tiles(small)[1:] == [(0, 0, 0, 0)] * 7  # padding tiles have no rows
    with pytest.raises(ValueError, match="capacity"):
        build_plan([(0, 9, ((0, 1.0),))], "cpu", capacity)
    with pytest.raises(ValueError, match="capacity"):
        build_plan([(0, 1, ((0, 1.0), (1, 1.0), (2, 1.0)))], "cpu", capacity)
