"""KV blocks and the prefix cache: reference-counted blocks, full blocks found again by content, LRU eviction.

Plain Python, no torch. The scheduler owns one ``BlockPool``; sequences hold blocks in their block
tables, and a block may be in several tables at once when it is a cached prefix they share.

**Identity.** A full block (``block_size`` computed KV entries) is indexed by its *digest*: sha256 of the
previous block's digest and the block's token ids. The chain starts at the sequence's identity: its tenant,
its adapter versions with the content hash of their files and their mixture weights, its prefix adapter
and number of virtual tokens (which occupy the first KV entries), or none of these for the base model. A
block is therefore found only by a sequence of the same tenant, computing with exactly the same weights,
whose every token up to the block's end is the same: its keys and values are what that sequence would
compute there. Blocks are never found across tenants, nor across versions of an adapter; a removed
version's blocks are dropped from the index (``drop_versions``).

**Lifetime.** Blocks are indexed as soon as their entries are computed (``cache_computed``, after each
step), so a running sequence's prompt is found by requests admitted after it, also mid chunked prefill.
A block no sequence holds stays in the index and waits in the free queue behind never-indexed free blocks,
least recently released first; it is evicted (dropped from the index) only when allocation reaches it, so
a block in use is never evicted. A finished sequence's blocks are released last block first, so its tail
goes before the prefix it may share. A preempted sequence finds its own blocks again when readmitted.

**Share.** With ``tenant_share`` one tenant's indexed blocks never exceed that fraction of all blocks:
past it, its own least recently used idle block makes way (or, when all of them are in use, the new block
is not indexed), so a tenant sending many distinct prompts cannot flush the others' prefixes.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import Counter, OrderedDict
from dataclasses import dataclass

from peftserve.engine.sequence import Sequence

IDENTITY_FORMAT = 1
"""Bumped if what goes into a sequence's identity changes."""
VIRTUAL_TOKEN = -1
"""The token id a prefix-tuning virtual token has in block digests (its values come with the identity)."""


def blocks_needed(num_tokens: int, block_size: int) -> int:
    """Blocks that hold num_tokens KV entries."""
    return -(-num_tokens // block_size)


def identity_digest(seq: Sequence) -> bytes:
    """The root of seq's digest chain: tenant, adapter versions (content hashes, weights) and prefix."""
    identity = [
        IDENTITY_FORMAT,
        seq.tenant,
        [[held.key, held.weight] for held in seq.deltas],  # json writes floats exactly (repr)
        seq.prefix_adapter,
        seq.num_virtual,
        list(seq.adapter_contents),
    ]
    return hashlib.sha256(json.dumps(identity).encode()).digest()


def block_digests(seq: Sequence, n: int, block_size: int) -> list[bytes]:
    """Digests of seq's first n KV blocks (all of whose tokens are known); memoized on the sequence."""
    digests = seq.block_digests
    if len(digests) < n:
        kv_tokens = [VIRTUAL_TOKEN] * seq.num_virtual + seq.token_ids
        parent = digests[-1] if digests else identity_digest(seq)
        for j in range(len(digests), n):
            tokens = array("q", kv_tokens[j * block_size : (j + 1) * block_size])
            parent = hashlib.sha256(parent + tokens.tobytes()).digest()
            digests.append(parent)
    return digests[:n]


@dataclass(frozen=True)
class CachedBlock:
    """What the index knows of one block."""

    digest: bytes
    tenant: str
    versions: tuple[str, ...]
    """Adapter version keys the block's values depend on."""


@dataclass
class PrefixCacheCounters:
    """Since start: KV entries looked up and found at admission (real tokens, not virtual), evictions."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    """Indexed blocks dropped to make room: memory pressure, or a tenant over its share."""


class BlockPool:
    """A fixed number of KV blocks: who holds them, which are free, and the prefix-cache index over them."""

    def __init__(
        self, num_blocks: int, block_size: int, caching: bool = True, tenant_share: float | None = None
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self.max_tenant_blocks = None if tenant_share is None else max(1, int(tenant_share * num_blocks))
        self.counters = PrefixCacheCounters()
        self._refs = [0] * num_blocks
        # Blocks no sequence holds: never-indexed ones at the front (taken first, the most recently freed
        # first), indexed ones behind them, least recently released first.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._by_digest: dict[bytes, int] = {}
        self._cached: dict[int, CachedBlock] = {}
        self._per_tenant: Counter[str] = Counter()
        self._idle: dict[str, OrderedDict[int, None]] = {}  # tenant -> its indexed free blocks, LRU first
        self._per_version: dict[str, set[int]] = {}

    # -- allocation ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks allocate can hand out now: free ones and indexed ones no sequence holds."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks held by sequences."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix-cache index, held or not."""
        return len(self._cached)

    def allocate(self, n: int) -> list[int]:
        """Take n blocks, evicting the least recently released indexed ones if needed; the caller checked
        num_free."""
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks with {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block, _ = self._free.popitem(last=False)
            if block in self._cached:
                self._uncache(block)
                self.counters.evictions += 1
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Release a block table; indexed blocks stay findable until evicted."""
        for block in reversed(blocks):  # the tail first: evicted before the prefix it extends
            self._refs[block] -= 1
            if self._refs[block]:
                continue
            cached = self._cached.get(block)
            self._free[block] = None
            if cached is None:
                self._free.move_to_end(block, last=False)
            else:
                self._idle.setdefault(cached.tenant, OrderedDict())[block] = None

    # -- the prefix cache -----------------------------------------------------------------------

    def lookup(self, seq: Sequence) -> list[int]:
        """The indexed blocks of seq's longest cached prefix; at least one KV entry is left to compute."""
        if not self.caching:
            return []
        limit = (seq.kv_len - 1) // self.block_size
        hits = []
        for digest in block_digests(seq, limit, self.block_size):
            block = self._by_digest.get(digest)
            if block is None or self._cached[block].tenant != seq.tenant:
                break
            hits.append(block)
        return hits

    def num_idle(self, blocks: list[int]) -> int:
        """How many of blocks no sequence holds (taking them lowers num_free)."""
        return sum(1 for b in blocks if not self._refs[b])

    def admit(self, seq: Sequence, hits: list[int], need: int) -> None:
        """Give seq its cached prefix (hits, from lookup) and need new blocks; its computation starts after
        the prefix. The caller checked need + num_idle(hits) <= num_free."""
        for block in hits:
            if not self._refs[block]:
                del self._free[block]
                self._unidle(block, self._cached[block].tenant)
            self._refs[block] += 1
        seq.blocks = hits + self.allocate(need)
        seq.num_cached = len(hits) * self.block_size
        seq.num_indexed_blocks = len(hits)
        seq.num_computed = max(seq.num_virtual, seq.num_cached)
        if not seq.num_preemptions:  # readmitted, it finds what it computed itself: that is not reported
            seq.num_cached_prompt = min(len(seq.prompt_ids), max(0, seq.num_cached - seq.num_virtual))
        if self.caching:
            self.counters.query_tokens += seq.kv_len - seq.num_virtual
            self.counters.hit_tokens += max(0, seq.num_cached - seq.num_virtual)

    def cache_computed(self, seq: Sequence) -> None:
        """Index seq's blocks that are full of computed entries and not indexed yet."""
        full = seq.num_computed // self.block_size
        if not self.caching or full <= seq.num_indexed_blocks:
            return
        digests = block_digests(seq, full, self.block_size)
        for j in range(seq.num_indexed_blocks, full):
            block, digest = seq.blocks[j], digests[j]
            # Another block may hold the same content (two requests prefilled it at once): keep that one.
            if digest not in self._by_digest and block not in self._cached and self._within_share(seq.tenant):
                self._index(block, CachedBlock(digest, seq.tenant, seq.adapter_keys))
        seq.num_indexed_blocks = full

    def drop_versions(self, keys: list[str]) -> None:
        """Forget the blocks computed with these adapter versions (removed: never to be found again)."""
        for key in keys:
            for block in list(self._per_version.get(key, ())):
                self._uncache(block)
                if not self._refs[block]:
                    self._free.move_to_end(block, last=False)

    def digest_of(self, block: int) -> bytes | None:
        """The digest a block is indexed under; None if it is not in the index."""
        cached = self._cached.get(block)
        return cached.digest if cached is not None else None

    def tenant_blocks(self, tenant: str) -> int:
        """Indexed blocks of one tenant, held or not."""
        return self._per_tenant[tenant]

    # -- internals --------------------------------------------------------------------------------

    def _within_share(self, tenant: str) -> bool:
        """Room for one more block of tenant's in the index, making it by evicting its LRU idle block."""
        if self.max_tenant_blocks is None or self._per_tenant[tenant] < self.max_tenant_blocks:
            return True
        idle = self._idle.get(tenant)
        if not idle:
            return False  # all its indexed blocks are in use
        block = next(iter(idle))
        self._uncache(block)
        self._free.move_to_end(block, last=False)
        self.counters.evictions += 1
        return True

    def _index(self, block: int, cached: CachedBlock) -> None:
        self._by_digest[cached.digest] = block
        self._cached[block] = cached
        self._per_tenant[cached.tenant] += 1
        for key in cached.versions:
            self._per_version.setdefault(key, set()).add(block)

    def _uncache(self, block: int) -> None:
        """Drop block from the index (its holders keep it; a free one is an ordinary free block now)."""
        cached = self._cached.pop(block)
        del self._by_digest[cached.digest]
        self._per_tenant[cached.tenant] -= 1
        if not self._per_tenant[cached.tenant]:
            del self._per_tenant[cached.tenant]
        self._unidle(block, cached.tenant)
        for key in cached.versions:
            blocks = self._per_version[key]
            blocks.discard(block)
            if not blocks:
                del self._per_version[key]

    def _unidle(self, block: int, tenant: str) -> None:
        idle = self._idle.get(tenant)
        if idle is not None:
            idle.pop(block, None)
            if not idle:
                del self._idle[tenant]
