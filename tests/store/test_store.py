"""AdapterStore: atomic versioned commits, manifest-only scans, deletes, quotas, symlinks, cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peftserve.errors import AdapterRejected, CapacityExceeded, FailedPrecondition
from peftserve.store import AdapterStore
from peftserve.store.files import sha256_hex
from peftserve.store.manifest import MANIFEST_NAME
from tests.store.helpers import manifest_of, put, stage

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
    staged, _ = stage(store, FILES)
    (tmp_path / ".trash" / "half-deleted").mkdir()
    (tmp_path / "acme" / "empty").mkdir(parents=True)  # a crash between mkdir and rename
    assert store.scan() == []
    AdapterStore(tmp_path)
    assert not staged.exists() and os.listdir(tmp_path / ".trash") == []
    assert not (tmp_path / "acme" / "empty").exists()


def test_commit_refuses_an_existing_version(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    put(store, "acme/lora", FILES)
    staged, entries = stage(store, FILES)
    with pytest.raises(FailedPrecondition, match="already has version v1"):
        store.commit(staged, manifest_of("acme/lora", 1, entries))


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
    put(store, "acme/a", FILES)
    put(store, "acme/b", FILES)
    store.check_quota("acme", "a")  # a new version of an existing adapter
    store.check_quota("globex", "c")  # another tenant
    with pytest.raises(CapacityExceeded, match="holds 2 adapters"):
        store.check_quota("acme", "c")


def test_uploads_go_to_disk_as_they_arrive_under_their_caps(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, max_upload_bytes=100)
    upload = store.begin_upload()
    upload.write("adapter_config.json", b"{}")
    upload.write("adapter_model.safetensors", b"\1" * 60)
    assert (upload.folder / "adapter_model.safetensors").stat().st_size == 60  # on disk, not in memory
    with pytest.raises(CapacityExceeded, match="limit of 100 bytes"):
        upload.write("adapter_model.safetensors", b"\1" * 40)  # 102 in all
    upload.discard()
    assert os.listdir(tmp_path / ".tmp") == []

    upload = store.begin_upload()
    for bad, match in [("../x", "not allowed"), ("model.bin", "pickle"), ("notes.txt", "unexpected file")]:
        with pytest.raises(AdapterRejected, match=match):
            upload.write(bad, b"x")
    upload.write("adapter_config.json", b"{")
    upload.write("adapter_model.safetensors", b"\0")
    with pytest.raises(AdapterRejected, match="two parts"):
        upload.write("adapter_config.json", b"}")
    big = AdapterStore(tmp_path / "big").begin_upload()
    with pytest.raises(AdapterRejected, match="adapter_config.json: larger than the limit of 65536"):
        big.write("adapter_config.json", b" " * (64 * 1024 + 1))
    entries = AdapterStore(tmp_path / "c").begin_upload()
    entries.write("adapter_model.safetensors", b"ab")
    entries.write("adapter_model.safetensors", b"c")
    entries.write("adapter_config.json", b"{}")
    assert [(e.name, e.size, e.sha256) for e in entries.finish()] == [
        ("adapter_config.json", 2, sha256_hex(b"{}")),
        ("adapter_model.safetensors", 3, sha256_hex(b"abc")),
    ]


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
    staged, entries = stage(store, FILES)
    with pytest.raises(FailedPrecondition, match="symlink"):
        store.commit(staged, manifest_of("evil/x", 1, entries))
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
