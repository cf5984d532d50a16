"""The host tier: normalized adapters in CPU memory, bounded in bytes, least recently used evicted first.

Plain Python (no torch): values only need an ``nbytes``. Loads run on a thread pool, off the engine
thread; concurrent loads of one key share one load. Entries a request holds are protected (the
registry counts the holds) and never evicted; while protected entries alone exceed the budget the
cache runs over it rather than fail a request.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


class HasBytes(Protocol):
    @property
    def nbytes(self) -> int: ...


V = TypeVar("V", bound=HasBytes)


@dataclass
class CacheStats:
    """Counters since start (read by the metrics collector at scrape time)."""

    hits: int = 0
    misses: int = 0
    """Lookups that had to wait for a load (their own or one already running)."""
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0


def _follow(shared: Future) -> Future:
    """A caller's own future for a shared load: cancelling it (a client went away) leaves the load running."""
    mine: Future = Future()

    def copy(done: Future) -> None:
        if not mine.set_running_or_notify_cancel():
            return
        if done.cancelled():
            mine.set_exception(RuntimeError("the adapter load was cancelled (shutting down)"))
        elif done.exception() is not None:
            mine.set_exception(done.exception())
        else:
            mine.set_result(done.result())

    shared.add_done_callback(copy)
    return mine


class HostCache(Generic[V]):
    """Bounded LRU of loaded adapters keyed by version key; thread-safe."""

    def __init__(self, capacity_bytes: int, pool: Executor) -> None:
        self.capacity_bytes = capacity_bytes
        self.stats = CacheStats()
        self.nbytes = 0
        self._pool = pool
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[V, int]] = OrderedDict()  # oldest first
        self._loading: dict[str, Future] = {}
        self._protected: set[str] = set()
        self._unwanted: set[str] = set()  # discarded while loading: not inserted when the load ends

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> V | None:
        """The value if resident (and mark it recently used)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def load(self, key: str, loader: Callable[[], V]) -> Future:
        """A future of the value: done at once on a hit, else one pooled loader() per key at a time."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self.stats.hits += 1
                self._entries.move_to_end(key)
                done: Future = Future()
                done.set_result(entry[0])
                return done
            self.stats.misses += 1
            self._unwanted.discard(key)
            shared = self._loading.get(key)
            if shared is None:
                shared = self._pool.submit(self._run, key, loader)
                self._loading[key] = shared
            return _follow(shared)

    def put(self, key: str, value: V) -> None:
        """Insert a value loaded elsewhere (an upload just validated it)."""
        with self._lock:
            self._insert(key, value)

    def protect(self, key: str) -> None:
        """Never evict key (a request holds it) until unprotect."""
        with self._lock:
            self._protected.add(key)

    def unprotect(self, key: str) -> None:
        with self._lock:
            self._protected.discard(key)
            self._evict_over_budget()

    def discard(self, key: str) -> None:
        """Drop key now (unload, superseded, deleted); a load under way is not inserted when it ends."""
        with self._lock:
            self._protected.discard(key)
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.nbytes -= entry[1]
            if key in self._loading:
                self._unwanted.add(key)

    # -- internals ----------------------------------------------------------------------------

    def _run(self, key: str, loader: Callable[[], V]) -> V:
        try:
            value = loader()
        except BaseException:
            with self._lock:
                self._loading.pop(key, None)
                self._unwanted.discard(key)
                self.stats.load_failures += 1
            raise
        with self._lock:
            self._loading.pop(key, None)
            self.stats.loads += 1
            if key in self._unwanted:
                self._unwanted.discard(key)
            else:
                self._insert(key, value)
        return value

    def _insert(self, key: str, value: V) -> None:
        size = value.nbytes
        old = self._entries.pop(key, None)
        if old is not None:
            self.nbytes -= old[1]
        self._entries[key] = (value, size)
        self.nbytes += size
        self._evict_over_budget()

    def _evict_over_budget(self) -> None:
        if self.nbytes <= self.capacity_bytes:
            return
        for key in list(self._entries):
            if self.nbytes <= self.capacity_bytes:
                return
            if key not in self._protected:
                _, size = self._entries.pop(key)
                self.nbytes -= size
                self.stats.evictions += 1
