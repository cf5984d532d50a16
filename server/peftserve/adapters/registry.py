"""The registry: adapter ids -> versions -> request holds; which version a new request gets, when one frees.

Plain bookkeeping (no torch, no I/O, no lock of its own: the AdapterManager serializes calls). Each
upload of an id adds a version and makes it current; new requests resolve to the current version (or
the one they pin with '@vN'), held versions stay until their last request ends. What must leave memory
is returned as data (version keys); the manager drops those from the host and device tiers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from peftserve.errors import AdapterNotFound, InvalidRequest, quote
from peftserve.store.ids import parse_version, split_id, split_version, version_key
from peftserve.store.manifest import AdapterManifest


@dataclass
class VersionRecord:
    """One registered version of an adapter."""

    adapter_id: str
    number: int
    manifest: AdapterManifest
    source: Path
    """The folder holding its PEFT files."""
    store_root: Path | None
    """The store it is in; None for a folder registered from outside (`serve --adapter`), never deleted."""
    holds: int = 0
    """Requests (and admin operations) bound to this version right now."""
    free_when_idle: bool = False
    """Superseded or unloaded: dropped from memory when its last hold ends."""
    removed: bool = False
    """Deleted or pruned: no longer addressable, forgotten when its last hold ends."""

    @property
    def key(self) -> str:
        return version_key(self.adapter_id, self.number)


@dataclass
class Removal:
    """What removing versions left to do: free memory of idle ones, wait for held ones, delete folders."""

    freed: list[str] = field(default_factory=list)
    held: list[VersionRecord] = field(default_factory=list)
    removed: list[VersionRecord] = field(default_factory=list)


class AdapterRegistry:
    """Registered adapters by full id; versions keyed '<tenant>/<name>@vN'."""

    def __init__(self) -> None:
        self._live: dict[str, dict[int, VersionRecord]] = {}  # id -> number -> record
        self._gone: dict[str, VersionRecord] = {}  # removed but still held, by key
        self._next: dict[str, int] = {}  # never reuse a number while this process lives

    # -- adding -------------------------------------------------------------------------------

    def next_version(self, adapter_id: str) -> int:
        """The number the next version of adapter_id gets."""
        live = self._live.get(adapter_id, {})
        return max(self._next.get(adapter_id, 1), max(live, default=0) + 1)

    def add(self, manifest: AdapterManifest, source: Path, store_root: Path | None) -> list[str]:
        """Register a version; if it is the newest it becomes current. Returns keys to free now."""
        number = parse_version(manifest.version)
        versions = self._live.setdefault(manifest.adapter_id, {})
        if number in versions or version_key(manifest.adapter_id, number) in self._gone:
            raise InvalidRequest(f"adapter {manifest.adapter_id!r} already has version {manifest.version}")
        current = versions[max(versions)] if versions else None
        record = VersionRecord(manifest.adapter_id, number, manifest, source, store_root)
        versions[number] = record
        self._next[manifest.adapter_id] = max(self._next.get(manifest.adapter_id, 1), number + 1)
        if current is None:
            return []
        return self._supersede(current if current.number < number else record)

    # -- lookups ------------------------------------------------------------------------------

    def lookup(self, full_id: str) -> VersionRecord:
        """The current version of 'tenant/name', or the pinned one of 'tenant/name@vN'."""
        adapter_id, number = split_version(full_id)
        versions = self._live.get(adapter_id)
        if not versions:
            raise AdapterNotFound(f"adapter {quote(full_id)} not found")
        record = versions.get(max(versions) if number is None else number)
        if record is None:
            raise AdapterNotFound(f"adapter {quote(full_id)} not found")
        return record

    def record(self, key: str) -> VersionRecord:
        """A version by key, removed-but-held ones included."""
        adapter_id, number = split_version(key)
        record = self._live.get(adapter_id, {}).get(number) if number else None
        record = record or self._gone.get(key)
        if record is None:
            raise AdapterNotFound(f"adapter {quote(key)} not found")
        return record

    def versions(self, adapter_id: str) -> list[VersionRecord]:
        """Addressable versions of an id, oldest first (empty if unknown)."""
        return [v for _, v in sorted(self._live.get(adapter_id, {}).items())]

    def holds(self, adapter_id: str) -> int:
        """Holds over every version of an id, removed ones included."""
        live = sum(v.holds for v in self._live.get(adapter_id, {}).values())
        return live + sum(v.holds for v in self._gone.values() if v.adapter_id == adapter_id)

    def names(self, tenant: str) -> list[str]:
        """The tenant's adapter names, sorted."""
        return sorted(split_id(i)[1] for i in self._live if split_id(i)[0] == tenant)

    def adapter_ids(self, tenant: str | None = None) -> list[str]:
        """Full ids of the tenant's adapters (every tenant's when None), sorted."""
        return sorted(i for i in self._live if tenant is None or split_id(i)[0] == tenant)

    def __len__(self) -> int:
        return len(self._live)

    # -- holds --------------------------------------------------------------------------------

    def hold(self, key: str) -> None:
        self.record(key).holds += 1

    def release(self, key: str) -> tuple[bool, bool]:
        """Drop one hold: (now idle, must be freed from memory now)."""
        record = self.record(key)
        if record.holds <= 0:
            raise InvalidRequest(f"adapter version {key!r} is released more often than held")
        record.holds -= 1
        if record.holds:
            return False, False
        free = record.free_when_idle or record.removed
        record.free_when_idle = False
        if record.removed:
            del self._gone[key]
        return True, free

    # -- state changes ------------------------------------------------------------------------

    def unload(self, adapter_id: str) -> list[str]:
        """Every version leaves memory: idle ones now (returned), held ones at their last release."""
        freed = []
        for record in self.versions(adapter_id):
            if record.holds:
                record.free_when_idle = True
            else:
                freed.append(record.key)
        return freed

    def remove(self, adapter_id: str, keep: int = 0) -> Removal:
        """Make all but the newest `keep` versions unaddressable (keep=0: delete the adapter)."""
        versions = self._live.get(adapter_id, {})
        doomed = sorted(versions)[: max(len(versions) - keep, 0)]
        result = Removal()
        for number in doomed:
            record = versions.pop(number)
            record.removed = True
            result.removed.append(record)
            if record.holds:
                self._gone[record.key] = record
                result.held.append(record)
            else:
                result.freed.append(record.key)
        if not versions:
            self._live.pop(adapter_id, None)
        return result

    def _supersede(self, record: VersionRecord) -> list[str]:
        if record.holds:
            record.free_when_idle = True
            return []
        return [record.key]
