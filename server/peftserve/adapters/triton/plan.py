"""The step's token layout for the Triton kernels: built once per step on the host, one copy to the device.

Tokens are grouped by *signature*, the exact (slot, weight) pairs of their sequence: the tokens of one
adapter form one group however many sequences use it, a mixture's tokens one group per distinct mixture.
Each token is in exactly one group, so each output row is written by one program with a fixed order of
summation: no atomics, and the kernels are deterministic. Groups are cut into tiles of at most `block_m`
rows. The low-rank shrink writes one row of the intermediate h per (group, pair, token), which the
expand reads back. Plain torch: importing it needs no Triton.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..batch import Span

BLOCK_M = (16, 32, 64)
"""Tile heights: the smallest that holds the step's largest group (tl.dot needs at least 16 rows)."""


@dataclass(frozen=True)
class Capacity:
    """Fixed sizes of a plan that a captured CUDA graph keeps reading (each field an upper bound)."""

    tokens: int
    pairs_per_token: int
    """Most adapters one sequence mixes."""
    rank: int
    """Width of the low-rank intermediate: the server's max rank."""


@dataclass(frozen=True)
class KernelPlan:
    """The step's groups, tiles and pairs, packed in one int32 device tensor.

    Layout of `data`: tokens [M] | tile first row [NT] | tile rows [NT] | tile group [NT] | tile offset in
    its group [NT] | group first pair [G] | group pairs [G] | pair slot [P] | pair first h row [P] |
    pair weight [P] (float32 bits).
    """

    data: torch.Tensor
    """[M + 4 NT + 2 G + 3 P] int32 on the device"""
    num_tokens: int
    """M: rows of the step that some slot updates (a row once whatever its number of slots)."""
    num_tiles: int
    num_groups: int
    num_pairs: int
    max_pairs: int
    """Most pairs of one group: the shrink's second grid dimension."""
    h_rows: int
    """Rows of the low-rank intermediate h: one per (group, pair, token)."""
    block_m: int
    rank_capacity: int = 0
    """Fixed width of the low-rank intermediate (a captured plan); 0: the step's largest rank."""

    def _part(self, index: int, length: int) -> torch.Tensor:
        sizes = (self.num_tokens, 4 * self.num_tiles, 2 * self.num_groups, 2 * self.num_pairs)
        start = sum(sizes[:index])
        return self.data[start : start + length]

    @property
    def tokens(self) -> torch.Tensor:
        """[M] token rows, group after group."""
        return self._part(0, self.num_tokens)

    @property
    def tiles(self) -> torch.Tensor:
        """[4 * NT]: first row in `tokens`, rows, group, offset of the first row within its group."""
        return self._part(1, 4 * self.num_tiles)

    @property
    def groups(self) -> torch.Tensor:
        """[2 * G]: first pair, number of pairs."""
        return self._part(2, 2 * self.num_groups)

    @property
    def pairs(self) -> torch.Tensor:
        """[2 * P]: slot, first h row (the group's first token; its others follow)."""
        return self._part(3, 2 * self.num_pairs)

    @property
    def weights(self) -> torch.Tensor:
        """[P] float32 mixture weight of each pair."""
        start = self.data.numel() - self.num_pairs
        return self.data[start:].view(torch.float32)


def pick_block_m(largest_group: int) -> int:
    return next((b for b in BLOCK_M if b >= largest_group), BLOCK_M[-1])


def build_plan(
    spans: Sequence[Span], device: torch.device | str, capacity: Capacity | None = None
) -> KernelPlan:
    """The plan of a step's spans (AdapterBatch.spans: validated, sorted, no empty one).

    With a capacity, every part is padded to its bound (tiles of 0 rows, groups of 0 pairs) and the tile
    height is the smallest, so that plans of different steps share one layout.
    """
    groups: dict[tuple[tuple[int, float], ...], list[int]] = {}
    for start, length, pairs in spans:
        groups.setdefault(pairs, []).extend(range(start, start + length))
    largest = max((len(rows) for rows in groups.values()), default=0)
    block_m = BLOCK_M[0] if capacity is not None else pick_block_m(largest)

    tokens: list[int] = []
    tiles: list[tuple[int, int, int, int]] = []
    group_rows: list[tuple[int, int]] = []
    pair_slots: list[int] = []
    pair_h: list[int] = []
    weights: list[float] = []
    h_rows = 0
    for index, (pairs, rows) in enumerate(groups.items()):
        first = len(tokens)
        tokens += rows
        tiles += [
            (first + off, min(block_m, len(rows) - off), index, off) for off in range(0, len(rows), block_m)
        ]
        group_rows.append((len(pair_slots), len(pairs)))
        for slot, weight in pairs:
            pair_slots.append(slot)
            pair_h.append(h_rows)
            weights.append(weight)
            h_rows += len(rows)
    max_pairs = max((n for _, n in group_rows), default=0)

    if capacity is not None:
        cap_pairs = capacity.tokens * capacity.pairs_per_token
        if (
            len(tokens) > capacity.tokens
            or len(pair_slots) > cap_pairs
            or max_pairs > capacity.pairs_per_token
        ):
            raise ValueError(f"the step exceeds the plan's capacity {capacity}")
        tokens += [0] * (capacity.tokens - len(tokens))
        tiles += [(0, 0, 0, 0)] * (capacity.tokens - len(tiles))
        group_rows += [(0, 0)] * (capacity.tokens - len(group_rows))
        pair_slots += [0] * (cap_pairs - len(pair_slots))
        pair_h += [0] * (cap_pairs - len(pair_h))
        weights += [0.0] * (cap_pairs - len(weights))
        max_pairs, h_rows = capacity.pairs_per_token, cap_pairs

    ints = torch.tensor(
        [
            *tokens,
            *(t[0] for t in tiles),
            *(t[1] for t in tiles),
            *(t[2] for t in tiles),
            *(t[3] for t in tiles),
            *(g[0] for g in group_rows),
            *(g[1] for g in group_rows),
            *pair_slots,
            *pair_h,
        ],
        dtype=torch.int32,
    )
    bits = torch.tensor(weights, dtype=torch.float32).view(torch.int32)
    data = torch.cat([ints, bits]).to(device, non_blocking=True)
    return KernelPlan(
        data=data,
        num_tokens=len(tokens),
        num_tiles=len(tiles),
        num_groups=len(group_rows),
        num_pairs=len(pair_slots),
        max_pairs=max_pairs,
        h_rows=h_rows,
        block_m=block_m,
        rank_capacity=capacity.rank if capacity is not None else 0,
    )
