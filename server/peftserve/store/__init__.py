"""The on-disk adapter store: ids, upload checks on raw bytes, atomic versioned folders, manifests.

Plain Python (no torch): the adapters package normalizes what the store holds.
"""

from .ids import DEFAULT_TENANT, full_adapter_id, join_id, split_id, split_version, version_key
from .store import AdapterStore, StoredVersion

__all__ = [
    "DEFAULT_TENANT",
    "AdapterStore",
    "StoredVersion",
    "full_adapter_id",
    "join_id",
    "split_id",
    "split_version",
    "version_key",
]
