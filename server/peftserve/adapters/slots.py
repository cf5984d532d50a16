"""The device tier: a bounded set of slots holding delta adapters (LRU among idle ones, pin/unpin).

A slot is held by every running sequence that uses its adapter (refcounted); held and pinned slots are
never evicted. Prefix adapters take no slot: their K/V are cached on the device, at most num_slots
unpinned ones. Mutations happen on the engine thread only (the layers read the slots during a
forward); request_drop and the read-only views may be called from any thread.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftserve.errors import CapacityExceeded, FailedPrecondition

from .layer import AdapterTarget, MultiAdapterLayer
from .normalized import NormalizedAdapter
from .transfer import DeltaCopier


@dataclass
class SlotStats:
    """Counters since start (read by the metrics collector at scrape time)."""

    loads: int = 0
    """Host -> device copies (delta adapters into slots, prefix K/V into the prefix cache)."""
    evictions: int = 0


class DeviceSlots:
    """Slots of the MultiAdapterLayers, keyed by version key."""

    def __init__(
        self,
        layers: dict[str, AdapterTarget],
        num_slots: int,
        device: torch.device,
        dtype: torch.dtype,
        on_load: Callable[[float], None] | None = None,
        slot_forms: dict[int, frozenset[type]] | None = None,
    ) -> None:
        """slot_forms: kept up to date with the forms each slot's adapter uses (AdapterContext's)."""
        self.layers = layers
        self.slot_forms = slot_forms if slot_forms is not None else {}
        self.num_slots = num_slots
        self.device = device
        self.dtype = dtype
        self.copier = DeltaCopier(device, dtype)
        self.max_pins = num_slots // 2
        """At most half the slots may be pinned, so a mixture of up to num_slots - max_pins always fits."""
        self.stats = SlotStats()
        self._on_load = on_load
        self._lock = threading.Lock()
        self._slot_of: dict[str, int] = {}
        self._paths: dict[str, tuple[str, ...]] = {}  # module paths each resident adapter occupies
        self._owner: list[str | None] = [None] * num_slots
        self._refs: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unheld, unpinned; oldest first
        self._pinned: set[str] = set()
        self._prefix: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._drops: deque[str] = deque()  # requested from any thread, applied on the engine thread
        self._drop_at_release: set[str] = set()

    # -- views (any thread) -------------------------------------------------------------------

    def slot_of(self, key: str) -> int | None:
        with self._lock:
            return self._slot_of.get(key)

    def is_resident(self, key: str) -> bool:
        with self._lock:
            return key in self._slot_of or key in self._prefix

    def is_pinned(self, key: str) -> bool:
        with self._lock:
            return key in self._pinned

    @property
    def pinned_slot_keys(self) -> frozenset[str]:
        """Pinned delta adapters in slots: the scheduler reserves their slots."""
        with self._lock:
            return self._pinned_in_slots()

    def __len__(self) -> int:
        return len(self._slot_of) + len(self._prefix)

    # -- sequences (engine thread) ------------------------------------------------------------

    def acquire(self, key: str, adapter: NormalizedAdapter) -> int | None:
        """Make a delta adapter resident and hold its slot; None for a prefix adapter (no slot).

        Takes a free slot or evicts the least recently released idle adapter; CapacityExceeded when
        every slot is held or pinned (the scheduler's slot budget prevents that).
        """
        if adapter.kind == "prefix":
            return None
        with self._lock:
            slot = self._slot_of.get(key)
            if slot is None:
                slot = self._place(key, adapter)
            self._refs[key] = self._refs.get(key, 0) + 1
            self._idle.pop(key, None)
            return slot

    def release(self, key: str) -> None:
        """Drop one hold from acquire; an idle adapter stays resident until its slot is needed."""
        with self._lock:
            refs = self._refs.get(key, 0)
            if refs <= 0:
                raise FailedPrecondition(f"adapter {key!r} is released more often than acquired")
            if refs > 1:
                self._refs[key] = refs - 1
                return
            del self._refs[key]
            if key in self._drop_at_release:
                self._evict(key)
            elif key not in self._pinned:
                self._idle[key] = None

    def prefix_kv(self, key: str, adapter: NormalizedAdapter) -> torch.Tensor:
        """[L, 2, kv_heads, nvt, head_dim] in the model's dtype on its device, cached per version."""
        assert adapter.prefix is not None
        with self._lock:
            kv = self._prefix.get(key)
            if kv is not None:
                self._prefix.move_to_end(key)
                return kv
            start = time.perf_counter()
            kv = adapter.prefix.kv.to(device=self.device, dtype=self.dtype)
            self._prefix[key] = kv
            self._loaded(start)
            unpinned = [k for k in self._prefix if k not in self._pinned]
            for old in unpinned[: max(len(unpinned) - self.num_slots, 0)]:
                del self._prefix[old]
                self.stats.evictions += 1
            return kv

    # -- administration (engine thread) -------------------------------------------------------

    def load(self, key: str, adapter: NormalizedAdapter, pin: bool) -> None:
        """Make an adapter resident without a request (LoadAdapter); pinned ones are never evicted."""
        if adapter.kind == "prefix":
            self.prefix_kv(key, adapter)
            with self._lock:
                if pin:
                    self._pinned.add(key)
            return
        with self._lock:
            if pin and key not in self._pinned and len(self._pinned_in_slots()) >= self.max_pins:
                raise CapacityExceeded(
                    f"at most {self.max_pins} of the {self.num_slots} adapter slots may be pinned; unload one"
                )
            if key not in self._slot_of:
                self._place(key, adapter)
                self._idle[key] = None
            if pin:
                self._pinned.add(key)
                self._idle.pop(key, None)
                self._drop_at_release.discard(key)  # pinned again: it stays after its last release
            elif key in self._idle:
                self._idle.move_to_end(key)

    def request_drop(self, key: str) -> None:
        """Ask for key to leave the device (unpinned, evicted once idle); any thread; see apply_drops."""
        self._drops.append(key)

    def apply_drops(self) -> None:
        """Apply requested drops (engine thread, between steps)."""
        while self._drops:
            key = self._drops.popleft()
            with self._lock:
                self._pinned.discard(key)
                self._prefix.pop(key, None)
                if key not in self._slot_of:
                    continue
                if self._refs.get(key):
                    self._drop_at_release.add(key)
                else:
                    self._evict(key)

    # -- internals (lock held) ----------------------------------------------------------------

    def _place(self, key: str, adapter: NormalizedAdapter) -> int:
        slot = self._free_slot()
        start = time.perf_counter()
        forms: set[type] = set()
        for path, delta in adapter.deltas.items():
            moved, ready = self.copier.copy(delta)
            target = self.layers[path]
            if isinstance(target, MultiAdapterLayer):
                target.load(slot, moved, ready)
                forms.update(part.form for part in delta.parts())
            else:  # expert stacks and routers do not wait for their copies: the compute stream does now
                self.copier.fence(ready)
                target.load(slot, moved)
                forms.add(type(target))
        self.slot_forms[slot] = frozenset(forms)
        self._owner[slot] = key
        self._slot_of[key] = slot
        self._paths[key] = tuple(adapter.deltas)
        self._loaded(start)
        return slot

    def _free_slot(self) -> int:
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        if not self._idle:
            raise CapacityExceeded(
                f"all {self.num_slots} adapter slots are held by running requests or pinned"
            )
        victim = next(iter(self._idle))
        slot = self._slot_of[victim]
        self._evict(victim)
        return slot

    def _evict(self, key: str) -> None:
        slot = self._slot_of.pop(key)
        for path in self._paths.pop(key):
            self.layers[path].clear(slot)
        self._owner[slot] = None
        self.slot_forms.pop(slot, None)
        self._idle.pop(key, None)
        self._drop_at_release.discard(key)
        self._pinned.discard(key)  # a pin lasts while the adapter is resident, never beyond
        self.stats.evictions += 1

    def _pinned_in_slots(self) -> frozenset[str]:
        return frozenset(k for k in self._pinned if k in self._slot_of)

    def _loaded(self, start: float) -> None:
        self.stats.loads += 1
        if self._on_load is not None:
            self._on_load(time.perf_counter() - start)
