"""AdapterStore: atomic versioned commits, manifest-only scans, deletes, quotas, symlinks, cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peftserve.errors import CapacityExceeded, FailedPrecondition
from peftserve.store import AdapterStore
from peftserve.store.files import sha256_hex
from peftserve.store.manifest import MANIFEST_NAME
from tests.store.helpers import manifest_of, put

FILES = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\0" * 64}


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def test_commit_scan_and_layout(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    first = put(store, "acme/lora", FILES)
    second = put(store, "acme/lora", {**FILES, "adapter_model.safetensors": b"\1" * 64})
    assert (first.manifest.version, second.manifest.version) == ("v1", "v2")
    assert second.path == tmp_path / "acme" / "lora" / "v2"
    assert sorted(os.listdir(second.path)) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        MANIFEST_NAME,
    ]
    assert os.listdir(tmp_path / ".tmp") == []
    scanned = AdapterStore(tmp_path).scan()
    assert [(s.manifest.adapter_id, s.manifest.version) for s in scanned] == [
        ("acme/lora", "v1"),
        ("acme/lora", "v2"),
    ]
    entry = {f.name: f for f in scanned[1].manifest.files}["adapter_model.safetensors"]
    assert entry.sha256 == sha256_hex(b"\1" * 64) and entry.size == 64
    assert store.next_version("acme", "lora") == 3 and store.next_version("acme", "new") == 1


def test_staged_versions_are_invisible_and_cleaned_at_open(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    staged = store.stage(FILES)
    (tmp_path / ".trash" / "half-deleted").mkdir()
    (tmp_path / "acme" / "empty").mkdir(parents=True)  # a crash between mkdir and rename
    assert store.scan() == []
    AdapterStore(tmp_path)
    assert not staged.exists() and os.listdir(tmp_path / ".trash") == []
    assert not (tmp_path / "acme" / "empty").exists()


def test_commit_refuses_an_existing_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    put(store, "acme/lora", FILES)
    staged = store.stage(FILES)
    with pytest.raises(FailedPrecondition, match="already has version v1"):
        store.commit(staged, manifest_of("acme/lora", 1, FILES))


def test_delete_adapter_and_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    put(store, "acme/a", FILES)
    put(store, "acme/a", FILES)
    put(store, "acme/b", FILES)
    assert store.delete_version("acme", "a", "v1")
    assert [s.manifest.version for s in store.scan() if s.manifest.adapter_id == "acme/a"] == ["v2"]
    assert store.delete_adapter("acme", "a") and not store.delete_adapter("acme", "a")
    assert [s.manifest.adapter_id for s in store.scan()] == ["acme/b"]
    assert os.listdir(tmp_path / ".trash") == []


def test_quotas(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, max_adapters_per_tenant=2, max_upload_bytes=100)
    with pytest.raises(CapacityExceeded, match="limit is 100 bytes"):
        store.check_quota("acme", "a", 101)
    put(store, "acme/a", FILES)
    put(store, "acme/b", FILES)
    store.check_quota("acme", "a", 10)  # a new version of an existing adapter
    store.check_quota("globex", "c", 10)  # another tenant
    with pytest.raises(CapacityExceeded, match="holds 2 adapters"):
        store.check_quota("acme", "c", 10)


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    outside.mkdir()
    store = AdapterStore(root)
    put(store, "acme/a", FILES)
    (root / "evil").symlink_to(outside, target_is_directory=True)  # a planted tenant
    (root / "acme" / "link").symlink_to(root / "acme" / "a")  # a planted adapter
    version = root / "acme" / "a" / "v1"
    (version / MANIFEST_NAME).rename(version / "real.json")
    (version / MANIFEST_NAME).symlink_to(version / "real.json")  # a planted manifest
    assert store.scan() == []
    staged = store.stage(FILES)
    with pytest.raises(FailedPrecondition, match="symlink"):
        store.commit(staged, manifest_of("evil/x", 1, FILES))
    with pytest.raises(FailedPrecondition, match="symlink"):
        store.delete_adapter("acme", "link")
    assert os.listdir(outside) == [] and (root / "acme" / "a" / "v1").is_dir()


def test_bad_manifests_are_skipped(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    put(store, "acme/a", FILES)
    put(store, "acme/b", FILES)
    (tmp_path / "acme" / "a" / "v1" / MANIFEST_NAME).write_text("{not json")
    bad_id = (tmp_path / "acme" / "b" / "v1" / MANIFEST_NAME).read_text().replace("acme/b", "acme/c")
    (tmp_path / "acme" / "b" / "v1" / MANIFEST_NAME).write_text(bad_id)
    (tmp_path / "acme" / "Bad_Name").mkdir()
    assert store.scan() == []
