"""Store test helpers (plain Python, no torch: the crash writer imports them in a bare subprocess)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path

from peftserve.store import AdapterStore, StoredVersion
from peftserve.store.manifest import AdapterManifest, FileEntry


def stage(store: AdapterStore, files: Mapping[str, bytes]) -> tuple[Path, tuple[FileEntry, ...]]:
    """Write files into a staged upload as a client would send them; the folder and its file entries."""
    upload = store.begin_upload()
    for name, data in files.items():
        upload.write(name, data)
    return upload.folder, upload.finish()


def manifest_of(adapter_id: str, version: int, files: tuple[FileEntry, ...]) -> AdapterManifest:
    """A manifest for arbitrary files (the store does not look inside them)."""
    return AdapterManifest(
        adapter_id=adapter_id,
        version=f"v{version}",
        kind="lora",
        peft_type="LORA",
        base_fingerprint="test-0000",
        ranks=(2,),
        target_modules=("model.layers.0.self_attn.q_proj",),
        num_virtual_tokens=0,
        nbytes=sum(f.size for f in files),
        files=files,
        created_at=time.time(),
    )


def put(store: AdapterStore, adapter_id: str, files: Mapping[str, bytes]) -> StoredVersion:
    """Stage and commit files as the next version of adapter_id."""
    tenant, name = adapter_id.split("/")
    folder, entries = stage(store, files)
    return store.commit(folder, manifest_of(adapter_id, store.next_version(tenant, name), entries))
