"""What the clients share for the Adapters service: reading a PEFT directory, chunking, conversion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from peftserve_client import AdapterFile, Tier, _core
from peftserve_client._proto import peftserve_pb2 as pb


def _peft_dir(root: Path) -> Path:
    root.mkdir()
    (root / "adapter_config.json").write_text("{}")
    (root / "adapter_model.safetensors").write_bytes(b"0123456789")
    (root / "empty.txt").write_bytes(b"")
    return root


def test_top_level_regular_files_by_name_and_folders_skipped(tmp_path: Path) -> None:
    root = _peft_dir(tmp_path / "a")
    (root / "checkpoint-10").mkdir()
    (root / "checkpoint-10" / "adapter_model.safetensors").write_bytes(b"old")
    names = [p.name for p in _core.adapter_files(root)]
    assert names == ["adapter_config.json", "adapter_model.safetensors", "empty.txt"]


def test_symlinks_are_refused_not_followed(tmp_path: Path) -> None:
    root = _peft_dir(tmp_path / "a")
    (tmp_path / "secret").write_text("do not upload")
    (root / "link").symlink_to(tmp_path / "secret")
    with pytest.raises(ValueError, match="symbolic link"):
        _core.adapter_files(root)


def test_special_files_missing_and_empty_directories_are_refused(tmp_path: Path) -> None:
    root = _peft_dir(tmp_path / "a")
    os.mkfifo(root / "pipe")
    with pytest.raises(ValueError, match="not a regular file"):
        _core.adapter_files(root)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        _core.adapter_files(tmp_path / "empty")
    with pytest.raises(NotADirectoryError):
        _core.adapter_files(tmp_path / "missing")


def test_upload_stream_is_the_id_then_each_file_in_chunks(tmp_path: Path) -> None:
    root = _peft_dir(tmp_path / "a")
    messages = list(_core.upload_requests("acme/x", _core.adapter_files(root), chunk_size=4))
    assert messages[0] == pb.UploadAdapterRequest(adapter_id="acme/x")
    chunks = [(m.file_name, m.data) for m in messages[1:]]
    assert chunks == [
        ("adapter_config.json", b"{}"),
        ("adapter_model.safetensors", b"0123"),
        ("adapter_model.safetensors", b"4567"),
        ("adapter_model.safetensors", b"89"),
        ("empty.txt", b""),
    ]
    assert not any(m.adapter_id for m in messages[1:])


def test_status_conversion_and_unknown_tiers(tmp_path: Path) -> None:
    msg = pb.AdapterStatus(
        manifest=pb.AdapterManifest(
            adapter_id="acme/x",
            version="v2",
            ranks=[8],
            files=[pb.AdapterFile(name="a", size=1, sha256="ff")],
            created_at=1.5,
        ),
        tier=pb.RESIDENCY_TIER_DEVICE,
        pinned=True,
        active_requests=3,
    )
    status = _core.to_adapter_status(msg)
    assert (status.adapter_id, status.manifest.ranks, status.manifest.files) == (
        "acme/x",
        (8,),
        (AdapterFile("a", 1, "ff"),),
    )
    assert (status.tier, status.pinned, status.active_requests) == (Tier.DEVICE, True, 3)
    assert _core.to_adapter_status(pb.AdapterStatus(tier=99)).tier is None
    page = _core.to_adapter_page(pb.ListAdaptersResponse(adapters=[msg], next_page_token="t"))
    assert page.adapters == (status,) and page.next_page_token == "t"
