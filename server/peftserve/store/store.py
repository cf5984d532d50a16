"""AdapterStore: versioned adapter folders under one root, committed atomically.

Layout: ``<root>/<tenant>/<name>/v<N>/`` holds the PEFT files and ``manifest.json``. A version is
written into a fresh folder under ``<root>/.tmp/`` (files and folder fsynced, the manifest last) and
renamed into place, then the parent is fsynced: a crash leaves the whole version or nothing. Deletes
rename into ``<root>/.trash/`` first. Both hidden folders are emptied when a store is opened.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from peftserve.errors import CapacityExceeded, FailedPrecondition
from peftserve.store.manifest import AdapterManifest

from .files import ensure_plain_dir, fsync_dir, inside, is_plain_dir, read_regular_file, write_durably
from .ids import ID_PART, VERSION, check_part, split_id
from .manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, manifest_from_json, manifest_to_json
from .staging import MAX_UPLOAD_BYTES, StagedUpload

log = logging.getLogger(__name__)

TMP_DIR = ".tmp"
TRASH_DIR = ".trash"


@dataclass(frozen=True)
class StoredVersion:
    """A committed version: its manifest and its folder."""

    manifest: AdapterManifest
    path: Path
    root: Path
    """The store's root (resolved)."""


class AdapterStore:
    """The on-disk adapter store (plain Python; no torch)."""

    def __init__(
        self,
        root: str | Path,
        max_adapters_per_tenant: int = 1000,
        max_upload_bytes: int = MAX_UPLOAD_BYTES,
        *,
        clean: bool = True,
    ) -> None:
        """clean=False leaves .tmp/ and .trash/ alone: other processes sharing the store may be writing."""
        Path(root).mkdir(parents=True, exist_ok=True)
        self.root = Path(root).resolve()
        self.max_adapters_per_tenant = max_adapters_per_tenant
        self.max_upload_bytes = max_upload_bytes
        self._tmp = self.root / TMP_DIR
        self._trash = self.root / TRASH_DIR
        if clean:
            self._clean()
        else:
            ensure_plain_dir(self._tmp)

    # -- reading ------------------------------------------------------------------------------

    def scan(self) -> list[StoredVersion]:
        """Every committed version, by reading manifests only (files are read when a version loads)."""
        return [
            stored
            for tenant in self._entries(self.root)
            for name in self._entries(self.root / tenant)
            for stored in self.versions(tenant, name)
        ]

    def versions(self, tenant: str, name: str) -> list[StoredVersion]:
        """The committed versions of one adapter, oldest first (empty if it has none)."""
        folder = self.root / check_part(tenant, "tenant") / check_part(name)
        if not is_plain_dir(folder):
            return []
        found: list[StoredVersion] = []
        for version in self._entries(folder, versions=True):
            path = folder / version
            try:
                manifest = manifest_from_json(read_regular_file(path / MANIFEST_NAME, MAX_MANIFEST_BYTES))
                if (manifest.adapter_id, manifest.version) != (f"{tenant}/{name}", version):
                    raise ValueError(f"it names {manifest.adapter_id}@{manifest.version}")
            except (OSError, ValueError, FailedPrecondition) as exc:
                log.warning("store: skipping %s/%s/%s: bad manifest (%s)", tenant, name, version, exc)
                continue
            found.append(StoredVersion(manifest, path, self.root))
        return found

    def adapter_names(self, tenant: str) -> list[str]:
        """Names of the tenant's adapters in the store (folders that hold a version)."""
        folder = self.root / check_part(tenant, "tenant")
        return self._entries(folder) if is_plain_dir(folder) else []

    def next_version(self, tenant: str, name: str) -> int:
        """One more than the newest version folder of an adapter (1 for a new one)."""
        folder = self.root / check_part(tenant, "tenant") / check_part(name)
        versions = self._entries(folder, versions=True) if is_plain_dir(folder) else []
        return int(versions[-1][1:]) + 1 if versions else 1

    def check_quota(self, tenant: str, name: str) -> None:
        """CapacityExceeded when one more adapter of this name would exceed the tenant's adapter count.

        The byte cap of an upload is enforced while it arrives (StagedUpload).
        """
        names = self.adapter_names(tenant)
        if name not in names and len(names) >= self.max_adapters_per_tenant:
            raise CapacityExceeded(
                f"the tenant holds {len(names)} adapters, the limit; delete one before uploading another"
            )

    # -- writing ------------------------------------------------------------------------------

    def begin_upload(self) -> StagedUpload:
        """A fresh folder under .tmp/ that receives an upload as it arrives (max_upload_bytes at most)."""
        return StagedUpload(Path(tempfile.mkdtemp(prefix="upload-", dir=self._tmp)), self.max_upload_bytes)

    def commit(self, staged: Path, manifest: AdapterManifest) -> StoredVersion:
        """Write the manifest into a staged folder and rename it into place as the manifest's version."""
        if staged.parent != self._tmp:
            raise ValueError(f"{staged} was not staged by this store")
        tenant, name = split_id(manifest.adapter_id)
        write_durably(staged / MANIFEST_NAME, manifest_to_json(manifest))
        fsync_dir(staged)
        adapter_dir = self.root / check_part(tenant, "tenant") / check_part(name)
        ensure_plain_dir(adapter_dir.parent)
        ensure_plain_dir(adapter_dir)
        target = adapter_dir / manifest.version
        if os.path.lexists(target):
            raise FailedPrecondition(
                f"adapter {manifest.adapter_id!r} already has version {manifest.version}"
            )
        os.rename(staged, target)
        fsync_dir(adapter_dir)
        fsync_dir(self._tmp)
        return StoredVersion(manifest, target, self.root)

    def delete_adapter(self, tenant: str, name: str) -> bool:
        """Remove every version of an adapter (atomically: one rename into .trash/); False if absent."""
        return self._remove(self.root / check_part(tenant, "tenant") / check_part(name))

    def delete_version(self, tenant: str, name: str, version: str) -> bool:
        """Remove one version folder; False if absent."""
        if not VERSION.fullmatch(version):
            raise ValueError(f"version {version!r} is not vN")
        return self._remove(self.root / check_part(tenant, "tenant") / check_part(name) / version)

    # -- internals ----------------------------------------------------------------------------

    def _remove(self, path: Path) -> bool:
        if not os.path.lexists(path):
            return False
        inside(self.root, path)
        ensure_plain_dir(self._trash)
        doomed = self._trash / uuid.uuid4().hex
        os.rename(path, doomed)
        fsync_dir(path.parent)
        fsync_dir(self._trash)
        shutil.rmtree(doomed, ignore_errors=True)
        return True

    def _entries(self, folder: Path, versions: bool = False) -> list[str]:
        """Sorted sub-folder names that are ids (or vN), skipping hidden entries, files and symlinks."""
        pattern = VERSION if versions else ID_PART
        names: list[str] = []
        try:
            listing = os.scandir(folder)
        except FileNotFoundError:  # removed meanwhile by another process sharing the store
            return names
        with listing as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    log.warning("store: ignoring symlink %s (symlinks are never followed)", entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    if pattern.fullmatch(entry.name):
                        names.append(entry.name)
                    else:
                        log.warning("store: ignoring folder %s (not a valid id)", entry.path)
        return sorted(names, key=lambda n: int(n[1:]) if versions else n)

    def _clean(self) -> None:
        """Empty .tmp/ and .trash/ (leftovers of a crash) and remove adapter folders a crash left empty."""
        for folder in (self._tmp, self._trash):
            ensure_plain_dir(folder)
            with os.scandir(folder) as entries:
                leftovers = list(entries)
            for entry in leftovers:
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            if leftovers:
                log.info(
                    "store: removed %d leftovers of interrupted writes in %s", len(leftovers), folder.name
                )
                fsync_dir(folder)
        for tenant in self._entries(self.root):
            for name in self._entries(self.root / tenant):
                folder = self.root / tenant / name
                if not any(folder.iterdir()):
                    folder.rmdir()
