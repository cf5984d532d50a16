"""StoreSync: one replica's adapter registry kept in step with a store that other replicas write.

Every replica reads the same store. A replica learns a version another replica committed when a
request pinned to it misses (refresh of that id), when an admin call announces it, and from a full
rescan every few seconds, which also forgets versions other replicas pruned or deleted. Adapters
registered from a folder (`--adapter ID=DIR`) are not the store's and are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable

from peftserve.adapters.admin import EngineCall
from peftserve.adapters.manager import AdapterManager
from peftserve.errors import AdapterNotFound, InvalidRequest
from peftserve.store import AdapterStore, StoredVersion
from peftserve.store.ids import parse_version, split_id

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
"""Lock files of the store's adapters (hidden: scans skip it)."""


@contextlib.asynccontextmanager
async def adapter_lock(store: AdapterStore, adapter_id: str) -> AsyncIterator[None]:
    """Held while a replica commits or deletes versions of one adapter: the others wait (flock, which
    the kernel releases if the holder dies), so version numbers are never taken twice."""
    folder = store.root / LOCKS_DIR
    folder.mkdir(exist_ok=True)
    fd = os.open(folder / (adapter_id.replace("/", "~") + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class StoreSync:
    """Adds the store's versions a replica lacks and removes those the store no longer has."""

    def __init__(self, manager: AdapterManager, store: AdapterStore, run_on_engine: EngineCall) -> None:
        self._manager = manager
        self._store = store
        self._run_on_engine = run_on_engine
        self._known: set[str] = set()
        """Ids this replica serves from the store; one that leaves the store is removed here too."""
        self._lock = threading.Lock()  # worker threads: one sync at a time

    # -- blocking (worker threads) ----------------------------------------------------------------

    def sync_all(self) -> int:
        """Rescan the whole store; returns how many adapter ids changed here."""
        by_id: dict[str, list[StoredVersion]] = defaultdict(list)
        for stored in self._store.scan():
            by_id[stored.manifest.adapter_id].append(stored)
        with self._lock:
            return sum(self._apply(i, by_id.get(i, [])) for i in sorted(set(by_id) | self._known))

    def refresh(self, adapter_ids: Iterable[str]) -> int:
        """Re-read these ids' versions from the store; returns how many changed here."""
        with self._lock:
            return sum(self._apply(i, self._store.versions(*split_id(i))) for i in set(adapter_ids))

    def _apply(self, adapter_id: str, stored: list[StoredVersion]) -> bool:
        """Make this replica's versions of adapter_id those of the store (oldest first in `stored`)."""
        registered = self._manager.registry.versions(adapter_id)
        if any(record.store_root is None for record in registered):
            return False
        have = {record.number for record in registered}
        changed = False
        if have:
            oldest = parse_version(stored[0].manifest.version) if stored else None
            keep = sum(1 for n in have if oldest is not None and n >= oldest)
            if keep < len(have):
                self._manager.remove(adapter_id, keep=keep)
                changed = True
        for version in stored:
            manifest = version.manifest
            if parse_version(manifest.version) in have:
                continue
            if manifest.base_fingerprint != self._manager.base.fingerprint:
                log.warning("store: %s@%s is for another base model", adapter_id, manifest.version)
                continue
            try:
                self._manager.add_stored(version)
            except InvalidRequest:  # removed here a moment ago and still held by a request
                continue
            changed = True
        if stored:
            self._known.add(adapter_id)
        else:
            self._known.discard(adapter_id)
        if changed:
            log.info("store: %s now has versions %s here", adapter_id, [s.manifest.version for s in stored])
        return changed

    # -- event loop -------------------------------------------------------------------------------

    async def sync_all_async(self) -> None:
        if await asyncio.to_thread(self.sync_all):
            await self._run_on_engine(self._manager.apply_drops)

    async def refresh_async(self, adapter_ids: Iterable[str]) -> bool:
        """refresh() off the event loop; memory of removed versions is freed between engine steps."""
        ids = list(adapter_ids)
        changed = await asyncio.to_thread(self.refresh, ids)
        if changed:
            await self._run_on_engine(self._manager.apply_drops)
        return bool(changed)

    async def unload(self, adapter_id: str) -> None:
        """Drop an adapter from this replica's memory (an unload made through another replica)."""
        try:
            self._manager.unload(adapter_id)
        except AdapterNotFound:
            return
        await self._run_on_engine(self._manager.apply_drops)
