"""AdapterAdminService: the AdapterAdmin protocol (engine/protocol.py) over the manager and the store."""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import Future, wait
from pathlib import Path
from typing import TypeVar

from peftserve.engine.protocol import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, AdapterStatus, FileChunks
from peftserve.errors import AdapterNotFound, FailedPrecondition, InvalidRequest, PeftServeError, quote
from peftserve.store import AdapterStore, StoredVersion
from peftserve.store.ids import check_part, join_id, parse_version, split_id, version_key
from peftserve.store.manifest import AdapterManifest, FileEntry
from peftserve.store.staging import StagedUpload

from .manager import AdapterManager
from .registry import Removal

log = logging.getLogger(__name__)

T = TypeVar("T")
EngineCall = Callable[[Callable[[], T]], Awaitable[T]]
"""Runs a function on the engine thread between steps and returns its result (AsyncEngine.run_on_engine)."""


async def receive_upload(
    store: AdapterStore, files: FileChunks
) -> tuple[StagedUpload, tuple[FileEntry, ...]]:
    """Write an upload's chunks into a fresh staged folder of the store as they arrive (memory: one chunk).

    The caller commits the folder or discards it; on an error here it is discarded already.
    """
    staged = await asyncio.to_thread(store.begin_upload)
    try:
        async for file_name, data in files:
            await asyncio.to_thread(staged.write, file_name, data)
        return staged, await asyncio.to_thread(staged.finish)
    except BaseException:
        await asyncio.to_thread(staged.discard)
        raise


async def _wait_all(futures: Iterable[Future]) -> None:
    await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))


class AdapterAdminService:
    """Adapter lifecycle for the admin API, one tenant per call; ids here are names inside that tenant.

    Blocking work (checks, validation, disk writes and deletes, loads) runs in worker threads; device
    changes run on the engine thread between steps. Requests in flight keep the versions they were
    bound to: nothing here waits for them, and nothing stops the engine.
    """

    def __init__(
        self,
        manager: AdapterManager,
        store: AdapterStore | None,
        run_on_engine: EngineCall,
        keep_versions: int = 3,
    ) -> None:
        self.manager = manager
        self.store = store
        self.keep_versions = keep_versions
        """Versions of an adapter kept in the store; older ones are removed once no request holds them."""
        self._run_on_engine = run_on_engine
        self._commit_lock = threading.Lock()  # version numbers, quotas and deletes, one at a time

    # -- AdapterAdmin ---------------------------------------------------------------------------

    async def upload(self, tenant: str, name: str, files: FileChunks) -> AdapterManifest:
        store = self._require_store()
        store.check_quota(tenant, name)
        staged, entries = await receive_upload(store, files)
        try:
            return await self.commit_upload(tenant, name, staged.folder, entries)
        finally:
            await asyncio.to_thread(staged.discard)  # a no-op once committed (the folder was renamed away)

    async def commit_upload(
        self, tenant: str, name: str, staged: Path, files: tuple[FileEntry, ...]
    ) -> AdapterManifest:
        """Validate a folder staged in the store's .tmp/ (here, or by another process sharing the store)
        as an adapter of this base model, and commit it as the adapter's next version."""
        adapter_id = join_id(tenant, name)
        stored = await asyncio.to_thread(self._commit, adapter_id, staged, files)
        await self._after_commit(adapter_id, stored)
        log.info(
            "uploaded adapter %s@%s (%d bytes)", adapter_id, stored.manifest.version, stored.manifest.nbytes
        )
        return stored.manifest

    async def load(self, tenant: str, name: str, pin: bool = False) -> AdapterStatus:
        adapter_id = join_id(tenant, name)
        key = self.manager.hold_current(adapter_id)
        try:
            await _wait_all(self.manager.ensure_host([key]))
            await self._run_on_engine(lambda: self.manager.load_to_device(key, pin))
        finally:
            self.manager.release_holds([key])
        return self.manager.status(adapter_id)

    async def unload(self, tenant: str, name: str) -> AdapterStatus:
        adapter_id = join_id(tenant, name)
        self.manager.unload(adapter_id)
        await self._run_on_engine(self.manager.apply_drops)
        return self.manager.status(adapter_id)

    async def delete(self, tenant: str, name: str) -> None:
        adapter_id = join_id(tenant, name)
        await asyncio.to_thread(self._delete, adapter_id)
        await self._run_on_engine(self.manager.apply_drops)
        log.info("deleted adapter %s", adapter_id)

    async def list(
        self, tenant: str | None, page_size: int, page_token: str
    ) -> tuple[list[AdapterStatus], str]:
        if tenant is not None:
            check_part(tenant, "tenant")
        if page_size < 0:
            raise InvalidRequest(f"page_size must be >= 0, got {page_size}")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        ids = self.manager.adapter_ids(tenant)
        start = bisect.bisect_right(ids, page_token) if page_token else 0
        page = ids[start : start + size]
        statuses = []
        for adapter_id in page:
            try:
                statuses.append(self.manager.status(adapter_id))
            except AdapterNotFound:  # deleted since the ids were read
                continue
        more = start + size < len(ids)
        return statuses, page[-1] if more and page else ""

    async def get(self, tenant: str, name: str) -> AdapterStatus:
        return self.manager.status(join_id(tenant, name))

    # -- worker threads -------------------------------------------------------------------------

    def _commit(self, adapter_id: str, staged: Path, files: tuple[FileEntry, ...]) -> StoredVersion:
        """Validate the staged folder as an adapter of this base model, then commit it as a new version."""
        store = self._require_store()
        tenant, name = split_id(adapter_id)
        adapter = self.manager.validate(staged)
        with self._commit_lock:
            store.check_quota(tenant, name)
            number = max(self.manager.next_version(adapter_id), store.next_version(tenant, name))
            stored = store.commit(staged, self.manager.manifest_for(adapter_id, number, adapter, files))
            self.manager.add_stored(stored, adapter)
        return stored

    def _delete(self, adapter_id: str) -> None:
        with self._commit_lock:
            removal = self.manager.remove(adapter_id, keep=0)
            if not removal.removed:
                raise AdapterNotFound(f"adapter {quote(adapter_id)} not found")
            self._keep_held_in_memory(removal)
            if self.store is not None:
                self.store.delete_adapter(*split_id(adapter_id))

    def _prune(self, adapter_id: str, removal: Removal) -> None:
        with self._commit_lock:
            self._keep_held_in_memory(removal)
            if self.store is not None:
                tenant, name = split_id(adapter_id)
                for record in removal.removed:
                    if record.store_root is not None:
                        self.store.delete_version(tenant, name, record.manifest.version)

    def _keep_held_in_memory(self, removal: Removal) -> None:
        """Held versions finish from host memory: load any not there yet before their files go."""
        futures = self.manager.ensure_host([r.key for r in removal.held])
        wait(futures)
        for record, future in zip(removal.held, futures, strict=True):
            if future.exception() is not None:
                log.warning("%s could not be loaded before its removal: %s", record.key, future.exception())

    # -- internals ------------------------------------------------------------------------------

    async def _after_commit(self, adapter_id: str, stored: StoredVersion) -> None:
        """Prune old versions; move a pin from the replaced version to the new one."""
        new_key = version_key(adapter_id, parse_version(stored.manifest.version))
        old_pins = [key for key in self.manager.pinned_versions(adapter_id) if key != new_key]
        removal = self.manager.remove(adapter_id, keep=self.keep_versions)
        if removal.removed:
            await asyncio.to_thread(self._prune, adapter_id, removal)
        for key in old_pins:
            self.manager.drop_from_device(key)
        await self._run_on_engine(self.manager.apply_drops)
        if old_pins:
            try:
                await self.load(*split_id(adapter_id), pin=True)
            except PeftServeError as exc:  # the upload itself is committed: report, do not fail it
                log.warning("%s: the pin could not move to the new version: %s", adapter_id, exc)

    def _require_store(self) -> AdapterStore:
        if self.store is None:
            raise FailedPrecondition(
                "this server runs without an adapter store (--store); uploads are disabled"
            )
        return self.store
