"""The adapter admin over HTTP around FakeAdmin: multipart and tar uploads, the lifecycle, limits, scopes."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import httpx2
import pytest

from peftserve.api.http.upload import BODY_OVERHEAD_BYTES
from peftserve_client import Client

from .conftest import UPLOAD_LIMIT, Served
from .fake_admin import QUOTA_BYTES, write_peft_dir


def multipart(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    """One file part per file of the directory, as curl -F file=@... sends them."""
    return [("file", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]


def tar_of(members: dict[str, bytes], compression: str = "", links: tuple[str, ...] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=f"w:{compression}") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return buffer.getvalue()


def http(s: Served, key: str | None = None) -> httpx2.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx2.Client(base_url=f"{s.base_url}/adapters", headers=headers, timeout=10)


def test_multipart_upload_and_the_lifecycle(local: Served, tmp_path: Path) -> None:
    weights = bytes(range(256)) * 10
    peft_dir = write_peft_dir(tmp_path / "a", weights=weights, r=4)
    with http(local) as admin:
        created = admin.post("/support", files=multipart(peft_dir))
        assert created.status_code == 201
        manifest = created.json()
        assert (manifest["adapter_id"], manifest["version"], manifest["ranks"]) == (
            "default/support",
            "v1",
            [4],
        )
        assert [f["name"] for f in manifest["files"]] == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        assert manifest["files"][2]["sha256"] == hashlib.sha256(weights).hexdigest()
        assert admin.post("/default/support", files=multipart(peft_dir)).json()["version"] == "v2"

        got = admin.get("/support").json()
        assert (got["manifest"]["version"], got["tier"], got["pinned"]) == ("v2", "disk", False)
        loaded = admin.post("/support/load", json={"pin": True}).json()
        assert (loaded["tier"], loaded["pinned"]) == ("device", True)
        assert admin.post("/support/load").json()["tier"] == "device"  # no body: not pinned anew
        assert admin.post("/support/unload").json()["tier"] == "disk"
        listed = admin.get("", params={"page_size": 10}).json()
        assert [a["manifest"]["adapter_id"] for a in listed["data"]] == ["default/support"]
        assert listed["next_page_token"] == ""
        assert admin.delete("/support").json() == {"adapter_id": "default/support", "deleted": True}
        gone = admin.get("/support")
        assert (
            gone.status_code == 404
            and gone.json()["error"]["message"] == "adapter 'default/support' not found"
        )
    methods = [method for method, _, _ in local.admin.calls]
    assert methods == ["upload", "upload", "get", "load", "load", "unload", "list", "delete", "get"]


def test_http_uploads_are_what_grpc_uploads_are(local: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a")
    with Client(local.address, timeout=5) as client:
        over_grpc = client.upload_adapter(peft_dir, "g")
    with http(local) as admin:
        over_http = admin.post("/h", files=multipart(peft_dir)).json()
    assert [(f["name"], f["size"], f["sha256"]) for f in over_http["files"]] == [
        (f.name, f.size, f.sha256) for f in over_grpc.files
    ]


@pytest.mark.parametrize("compression", ["", "gz"])
@pytest.mark.parametrize("prefix", ["", "./", "my-adapter/"])
def test_tar_uploads(local: Served, tmp_path: Path, compression: str, prefix: str) -> None:
    peft_dir = write_peft_dir(tmp_path / "a")
    archive = tar_of({prefix + p.name: p.read_bytes() for p in peft_dir.iterdir()}, compression)
    content_type = "application/gzip" if compression else "application/x-tar"
    with http(local) as admin:
        created = admin.post("/t", content=archive, headers={"content-type": content_type})
    assert created.status_code == 201, created.text
    assert sorted(f["name"] for f in created.json()["files"]) == sorted(p.name for p in peft_dir.iterdir())


@pytest.mark.parametrize(
    ("archive", "text"),
    [
        (tar_of({"a/adapter_config.json": b"{}", "b/adapter_model.safetensors": b"w"}), "at the top"),
        (tar_of({"../adapter_config.json": b"{}"}), "outside the archive"),
        (tar_of({"/etc/adapter_config.json": b"{}"}), "outside the archive"),
        (tar_of({"adapter_config.json": b"{}"}, links=("adapter_model.safetensors",)), "links are refused"),
        (b"not a tar at all" * 64, "not a readable tar archive"),
    ],
)
def test_bad_archives_are_400(local: Served, archive: bytes, text: str) -> None:
    with http(local) as admin:
        refused = admin.post("/t", content=archive, headers={"content-type": "application/x-tar"})
    assert refused.status_code == 400 and text in refused.json()["error"]["message"]
    assert not local.admin.adapters  # the stream failed mid-way: nothing was stored


def test_refusals_before_the_admin(local: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a")
    with http(local) as admin:
        unknown_type = admin.post("/x", content=b"{}", headers={"content-type": "application/json"})
        assert (
            unknown_type.status_code == 400
            and "multipart/form-data" in unknown_type.json()["error"]["message"]
        )
        not_a_file = admin.post("/x", data={"note": "hi"}, files=multipart(peft_dir))
        assert (
            not_a_file.status_code == 400 and "'note' is not a file" in not_a_file.json()["error"]["message"]
        )
        twice = [("f", ("adapter_config.json", b"{}")), ("g", ("adapter_config.json", b"{}"))]
        assert "appears twice" in admin.post("/x", files=twice).json()["error"]["message"]
        too_many = [("f", (f"f{i}", b"")) for i in range(9)]
        assert admin.post("/x", files=too_many).status_code == 400
        stranger = admin.post("/x", files=[("f", ("modeling.py", b"import os"))])
        assert stranger.status_code == 400 and "unexpected file" in stranger.json()["error"]["message"]
        versioned = admin.post("/x@v1", files=multipart(peft_dir))
        assert versioned.status_code == 400 and "no @version" in versioned.json()["error"]["message"]
    assert not local.admin.adapters


def test_the_size_cap_is_grpcs(local: Served, tmp_path: Path) -> None:
    over = write_peft_dir(tmp_path / "big", weights=b"\0" * UPLOAD_LIMIT)
    with http(local) as admin:
        refused = admin.post("/big", files=multipart(over))
        assert refused.status_code == 413
        assert (
            refused.json()["error"]["message"]
            == f"the upload is larger than the server's limit of {UPLOAD_LIMIT} bytes"
        )
        huge = admin.post("/big", files=[("f", ("w", b"\0" * (UPLOAD_LIMIT + BODY_OVERHEAD_BYTES)))])
        assert huge.status_code == 413  # the body limit: never read whole
        bomb = tar_of({"adapter_model.safetensors": b"\0" * (4 * UPLOAD_LIMIT)}, "gz")  # small compressed
        assert len(bomb) < UPLOAD_LIMIT
        refused = admin.post("/big", content=bomb, headers={"content-type": "application/gzip"})
        assert refused.status_code == 413
    assert not local.admin.adapters


def test_admin_errors_map_like_grpc(local: Served, tmp_path: Path) -> None:
    with http(local) as admin:
        other_base = write_peft_dir(tmp_path / "o", base_model="another-model")
        refused = admin.post("/o", files=multipart(other_base))
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "failed_precondition"
        over_quota = write_peft_dir(tmp_path / "q", weights=b"\0" * (QUOTA_BYTES + 1))
        full = admin.post("/q", files=multipart(over_quota))
        assert full.status_code == 429 and full.json()["error"]["code"] == "resource_exhausted"
        assert admin.post("/missing/load").status_code == 404


def test_scopes_and_tenants(with_keys: Served, tmp_path: Path) -> None:
    keys = with_keys.api_keys
    peft_dir = write_peft_dir(tmp_path / "a")
    with http(with_keys, keys["acme-infer"]) as admin:
        denied = admin.get("")
        assert denied.status_code == 403 and "'admin' scope" in denied.json()["error"]["message"]
        assert admin.post("/x", files=multipart(peft_dir)).status_code == 403
    with http(with_keys) as admin:
        assert admin.get("").status_code == 401
    with http(with_keys, keys["acme"]) as admin:
        assert admin.post("/x", files=multipart(peft_dir)).json()["adapter_id"] == "acme/x"
        assert admin.get("/globex/x").status_code == 404
    with http(with_keys, keys["globex"]) as admin:
        assert admin.get("").json()["data"] == []
    assert ("upload", "acme", "x") in with_keys.admin.calls
