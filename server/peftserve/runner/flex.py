"""Attention that reads the paged pools in place: torch's flex attention with one block mask per step.

The whole pool of a layer is flex's key/value sequence (`[1, Hkv, slots, D]`, a view: nothing is
copied), and each packed token is one query block whose key blocks are its own sequence's pool blocks.
The kernel walks only those blocks, so no context is gathered into a padded buffer, and grouped KV heads
are never expanded: a token's G query heads that share a KV head are the G rows of its query block
(queries are laid out `[1, Hkv, T * G, D]`, row t * G + g), so each key block is read once per KV head.

Blocks wholly inside a token's visible range run without a mask; at most two per token (the one holding
the token itself, and the first of a sliding window) are masked by KV position. A masked entry still
enters the kernel's p·V product with weight 0, and 0 x NaN is NaN: so the runner zeroes the value rows
past each sequence's end in its last block before the step (masked keys are harmless: the mask replaces
their scores). Every other entry a token reads is its own sequence's computed K/V.

Compiled once per process by torch.compile (inductor's C++ template on CPU; about 10-40 s cold, a few
seconds from inductor's on-disk cache); with --attention flex the runner compiles it at start
(ModelRunner._warm_up). The CPU default, --attention cpp (runner/paged_kernel.py), reads the same layout
in a kernel of our own that needs no compile.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

RECOMPILE_LIMIT = 64
"""Shapes compiled per process (one per model geometry and pool size)."""

MIN_TOKENS = 2
"""The fewest tokens the kernel is called on. A step of one token (a lone decode) gets a companion: the
same query at its sequence's first KV entry, which reads one block and whose output is dropped.
torch.compile specializes a size of 1, so the kernel compiled for any token count would otherwise be
compiled again for one token, which doubled its share of start-up (~2 s). Each token is a query block
of its own, so the companion changes nothing in the token's output."""


def _attend(q, k, v, blocks, block_pos, token_pos, first, group: int, block_size: int, scale, softcap):
    """flex attention over the pool with the step's block mask; the mask is built inside the compiled
    region so that its lengths stay as symbolic as the tensors' (the token count is the one dynamic size)."""
    num_partial, partial, num_full, full = blocks

    def mask_mod(b, h, q_idx, kv_idx):
        token = q_idx // group
        kv_pos = block_pos[kv_idx // block_size] * block_size + kv_idx % block_size
        return (kv_pos <= token_pos[token]) & (kv_pos >= first[token])

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / softcap) * softcap

    mask = BlockMask.from_kv_blocks(
        num_partial,
        partial,
        num_full,
        full,
        BLOCK_SIZE=(group, block_size),
        mask_mod=mask_mod,
        seq_lengths=(q.shape[2], k.shape[2]),
        compute_q_blocks=False,
    )
    score = None if softcap is None else score_mod
    return flex_attention(q, k, v, score_mod=score, block_mask=mask, scale=scale)


@functools.cache
def _kernel():
    """_attend compiled once per process: static shapes but the token count (marked at each call)."""
    return torch.compile(_attend, fullgraph=True, dynamic=False)


@dataclass
class PagedLayout:
    """Where each packed token's context lies in the pool; built once per step, shared by all layers."""

    block_size: int
    pool_slots: int
    """Slots of the pool (every slot of a layer's keys, the null slot included)."""
    token_pos: torch.Tensor
    """[T] KV index of each packed token (its own entry, written this step)."""
    token_row: torch.Tensor
    """[T] row of `tables` holding the token's sequence."""
    tables: torch.Tensor
    """[C, W] block table of each sequence in the step, padded with the null slot's block."""
    block_pos: torch.Tensor
    """[pool_blocks] logical index of each pool block in its sequence (this step's blocks only)."""
    _visible: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls, chunks: list[tuple[int, int, list[int]]], block_size: int, pool_slots: int, device: torch.device
    ) -> PagedLayout:
        """From (KV index of the first token, tokens, block table) of each chunk, in packing order."""
        positions: list[int] = []
        rows: list[int] = []
        for row, (start, num_tokens, _) in enumerate(chunks):
            positions += range(start, start + num_tokens)
            rows += [row] * num_tokens
        if len(positions) == 1:  # a lone token and its companion at KV index 0: see MIN_TOKENS
            positions, rows = [positions[0], 0], rows * MIN_TOKENS
        width = max(len(blocks) for _, _, blocks in chunks)
        # Padding names the last block of the pool, past the sequences' (it holds the null slot): no
        # sequence owns it, so its block_pos is never read.
        pad = (pool_slots - 1) // block_size
        table = [blocks + [pad] * (width - len(blocks)) for _, _, blocks in chunks]
        tables = torch.tensor(table, dtype=torch.long, device=device)  # [C, W]
        layout = cls(
            block_size=block_size,
            pool_slots=pool_slots,
            token_pos=torch.tensor(positions, dtype=torch.long, device=device),
            token_row=torch.tensor(rows, dtype=torch.long, device=device),
            tables=tables,
            block_pos=torch.empty(0),
        )
        layout.block_pos = torch.zeros(layout.pool_blocks, dtype=torch.int32, device=device)
        layout.block_pos[tables] = torch.arange(width, dtype=torch.int32, device=device).expand_as(tables)
        return layout

    @property
    def pool_blocks(self) -> int:
        """Blocks of `block_size` slots covering the pool (the null slot's block included)."""
        return -(-self.pool_slots // self.block_size)

    def visible(self, window: int | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """For one sliding window (None: causal only): each token's first visible KV index [T], and
        its blocks as flex's (partial count [1, 1, T], partial [1, 1, T, NB], full count, full)."""
        if window not in self._visible:
            self._visible[window] = self._build(window)
        return self._visible[window]

    def first(self, window: int | None) -> torch.Tensor:
        """[T] each token's first visible KV index under a sliding window (None: causal only, 0)."""
        key = ("first", window)
        if key not in self._visible:
            pos = self.token_pos
            first = (pos - window + 1).clamp_(min=0) if window is not None else torch.zeros_like(pos)
            self._visible[key] = first
        return self._visible[key]

    def _build(self, window: int | None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        bs, pos, first = self.block_size, self.token_pos, self.first(window)  # [T] each
        lo, hi = first // bs, pos // bs  # [T] logical blocks holding the first and last visible entry
        full_lo = (first + bs - 1) // bs  # first block that starts inside the visible range
        num_full = ((pos + 1) // bs - full_lo).clamp_(min=0)  # blocks wholly visible
        partial_lo = lo < full_lo  # the first block starts before the window
        partial_hi = ((pos + 1) % bs != 0) & ~(partial_lo & (hi == lo))  # the token's block, if not yet full
        rows = self.tables.index_select(0, self.token_row)  # [T, W]
        num_tokens = pos.shape[0]

        partial = torch.zeros(1, 1, num_tokens, self.pool_blocks, dtype=torch.int32, device=pos.device)
        logical = torch.stack([torch.where(partial_lo, lo, hi), hi], dim=1)  # [T, 2]
        partial[0, 0, :, :2] = rows.gather(1, logical.clamp(max=rows.shape[1] - 1))
        num_partial = (partial_lo.int() + partial_hi.int())[None, None]  # [1, 1, T]

        full = torch.zeros_like(partial)
        width = int(num_full.max()) if num_tokens else 0
        if width:
            logical = full_lo[:, None] + torch.arange(width, device=pos.device)  # [T, width]
            full[0, 0, :, :width] = rows.gather(
                1, logical.clamp_(max=rows.shape[1] - 1)
            )  # [T, width]; entries past num_full unread

        blocks = (num_partial.to(torch.int32), partial, num_full.to(torch.int32)[None, None], full)
        return first, blocks


def unwritten_tails(chunks: list[tuple[int, int, list[int]]], block_size: int) -> list[int]:
    """Pool slots past each chunk's last KV entry in the same block: unwritten, yet read (masked)."""
    tails: list[int] = []
    for start, num_tokens, blocks in chunks:
        end = start + num_tokens
        if end % block_size:
            last = blocks[(end - 1) // block_size] * block_size
            tails += range(last + end % block_size, last + block_size)
    return tails


def flex_paged_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    layout: PagedLayout,
    scaling: float,
    window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """Causal attention of every packed token over its own sequence's entries in the pool.

    Semantics: ``out[t] = softmax(cap(q[t] · K_s[first:p+1]ᵀ · scaling)) · V_s[first:p+1]`` for token t
    of sequence s at KV index p, with ``first = max(0, p - window + 1)`` (0 without a window) and
    ``cap(x) = softcap · tanh(x / softcap)`` (identity without softcap); query head h reads KV head
    h // G. Reference: paged_attention's SDPA path (tests/runner/test_flex_attention.py).
    query: [1, Hq, T, D]; keys, values: one layer's pool, [slots, Hkv, D]. Returns [1, T, Hq, D].
    """
    queries = query.shape[2]
    listed = layout.token_pos.shape[0]  # a lone query's companion is listed too (MIN_TOKENS)
    query = query.expand(-1, -1, listed, -1)  # its companion asks the same query; raises on any other gap
    _, num_heads, num_tokens, head_dim = query.shape
    kv_heads = keys.shape[1]
    group = num_heads // kv_heads
    q = query[0].view(kv_heads, group, num_tokens, head_dim).transpose(1, 2)  # [Hkv, T, G, D]
    # contiguous whatever the caller's strides (a view when G is 1, plain multi-head attention): the
    # compiled graph is guarded on them
    q = q.reshape(1, kv_heads, num_tokens * group, head_dim).contiguous()
    k = keys.permute(1, 0, 2)[None]  # [1, Hkv, slots, D], a view of the pool
    v = values.permute(1, 0, 2)[None]
    first, blocks = layout.visible(window)
    for tensor, dim in ((q, 2), (layout.token_pos, 0), (first, 0), *((b, 2) for b in blocks)):
        torch._dynamo.maybe_mark_dynamic(tensor, dim)
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        out = _kernel()(q, k, v, blocks, layout.block_pos, layout.token_pos, first, group,
                        layout.block_size, scaling, softcap)  # fmt: skip
    # out: [1, Hkv, T*G, D]
    out = out[0].view(kv_heads, num_tokens, group, head_dim).transpose(0, 1)  # [T, Hkv, G, D]
    return out[:queries].reshape(1, queries, num_heads, head_dim)
