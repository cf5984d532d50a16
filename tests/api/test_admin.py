"""The Adapters service over a real server and FakeAdmin: every RPC, pagination, upload limits, errors."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable
from pathlib import Path

import grpc
import pytest

from peftserve import errors
from peftserve_client import (
    AsyncClient,
    Client,
    FailedPrecondition,
    InternalError,
    InvalidArgument,
    NotFound,
    PeftServeError,
    ResourceExhausted,
    Tier,
    _core,
)
from peftserve_client._proto import peftserve_pb2 as pb
from peftserve_client._proto import peftserve_pb2_grpc as pb_grpc

from .conftest import UPLOAD_LIMIT, Served
from .fake_admin import QUOTA_BYTES, write_peft_dir


def test_upload_streams_every_file_and_returns_the_manifest(served: Served, tmp_path: Path) -> None:
    weights = bytes(range(256)) * 10
    peft_dir = write_peft_dir(tmp_path / "a", weights=weights, r=4)
    with Client(served.address, timeout=5) as client:
        manifest = client.upload_adapter(peft_dir, "support")
    assert (manifest.adapter_id, manifest.version, manifest.ranks) == ("default/support", "v1", (4,))
    names = [f.name for f in manifest.files]
    assert names == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert manifest.files[2].sha256 == hashlib.sha256(weights).hexdigest()
    assert manifest.nbytes == sum(p.stat().st_size for p in peft_dir.iterdir())
    assert served.admin.calls == [("upload", "default", "support")]


def test_upload_replaces_and_the_lifecycle_reaches_the_admin(served: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a")
    with Client(served.address, timeout=5) as client:
        client.upload_adapter(peft_dir, "x")
        assert client.upload_adapter(peft_dir, "default/x").version == "v2"
        got = client.get_adapter("x")
        assert (got.adapter_id, got.manifest.version, got.tier, got.pinned) == (
            "default/x",
            "v2",
            Tier.DISK,
            False,
        )
        loaded = client.load_adapter("x", pin=True)
        assert (loaded.tier, loaded.pinned) == (Tier.DEVICE, True)
        assert client.unload_adapter("x").tier is Tier.DISK
        assert client.delete_adapter("x") is None
        with pytest.raises(NotFound, match="'default/x' not found"):
            client.get_adapter("x")
    methods = [method for method, _, _ in served.admin.calls]
    assert methods == ["upload", "upload", "get", "load", "unload", "delete", "get"]


def test_local_mode_may_name_any_tenant(served: Served, tmp_path: Path) -> None:
    with Client(served.address, timeout=5) as client:
        manifest = client.upload_adapter(write_peft_dir(tmp_path / "a"), "acme/x")
    assert manifest.adapter_id == "acme/x" and served.admin.calls == [("upload", "acme", "x")]


def test_local_mode_lists_every_adapter_a_local_caller_can_use(served: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a", weights=b"w")
    with Client(served.address, timeout=5) as client:
        for i in range(5):
            client.upload_adapter(peft_dir, f"a{i}")
        client.upload_adapter(peft_dir, "other/stored")  # a local caller may name it: it is listed
        first = client.list_adapters(page_size=2)
        second = client.list_adapters(page_size=2, page_token=first.next_page_token)
        every = [s.adapter_id for s in client.iter_adapters(page_size=2)]
        default_size = client.list_adapters()
    assert [s.adapter_id for s in first.adapters] == ["default/a0", "default/a1"] and first.next_page_token
    assert [s.adapter_id for s in second.adapters] == ["default/a2", "default/a3"]
    assert every == [*(f"default/a{i}" for i in range(5)), "other/stored"]
    assert default_size.next_page_token == "" and len(default_size.adapters) == 6
    assert served.admin.page_sizes[-1] == 100


def test_a_keyed_caller_lists_its_own_tenant_only(keyed: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a", weights=b"w")
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["acme"]) as acme:
        acme.upload_adapter(peft_dir, "mine")
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["globex"]) as globex:
        globex.upload_adapter(peft_dir, "theirs")
        assert [s.adapter_id for s in globex.iter_adapters()] == ["globex/theirs"]


def test_async_client_runs_every_admin_call(served: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a")

    async def main() -> None:
        async with AsyncClient(served.address, timeout=5) as client:
            assert (await client.upload_adapter(peft_dir, "x")).version == "v1"
            await client.upload_adapter(peft_dir, "y")
            assert (await client.load_adapter("x")).tier is Tier.DEVICE
            assert (await client.get_adapter("x")).tier is Tier.DEVICE
            assert (await client.unload_adapter("x")).tier is Tier.DISK
            page = await client.list_adapters(page_size=1)
            assert [s.adapter_id for s in page.adapters] == ["default/x"] and page.next_page_token
            assert [s.adapter_id async for s in client.iter_adapters(page_size=1)] == [
                "default/x",
                "default/y",
            ]
            await client.delete_adapter("x")
            with pytest.raises(NotFound):
                await client.delete_adapter("x")

    asyncio.run(main())


def test_upload_over_the_size_cap_is_refused_mid_stream(served: Served, tmp_path: Path) -> None:
    total = 2048 * UPLOAD_LIMIT  # 32 MiB: more than gRPC's flow-control windows take in at once
    peft_dir = write_peft_dir(tmp_path / "big", weights=b"\x01" * total)
    sent = 0

    def counted(requests: Iterable[pb.UploadAdapterRequest]) -> Iterable[pb.UploadAdapterRequest]:
        nonlocal sent
        for request in requests:
            sent += len(request.data)
            yield request

    with grpc.insecure_channel(served.address) as channel:
        stub = pb_grpc.AdaptersStub(channel)
        chunks = _core.upload_requests("big", _core.adapter_files(peft_dir), chunk_size=64 * 1024)
        with pytest.raises(grpc.RpcError) as info:
            stub.UploadAdapter(counted(chunks), timeout=5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"limit of {UPLOAD_LIMIT} bytes" in info.value.details()
    assert sent < total // 2  # the server stopped the stream long before the client ran out of data
    assert not served.admin.adapters


def _upload_raw(served: Served, messages: list[pb.UploadAdapterRequest]) -> grpc.RpcError:
    with grpc.insecure_channel(served.address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.AdaptersStub(channel).UploadAdapter(iter(messages), timeout=5)
    return info.value


CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _chunk(name: str, data: bytes = b"x") -> pb.UploadAdapterRequest:
    return pb.UploadAdapterRequest(file_name=name, data=data)


@pytest.mark.parametrize(
    ("messages", "code", "match"),
    [
        ([], grpc.StatusCode.INVALID_ARGUMENT, "first UploadAdapterRequest must carry adapter_id"),
        ([_chunk("a")], grpc.StatusCode.INVALID_ARGUMENT, "must carry adapter_id"),
        (
            [pb.UploadAdapterRequest(adapter_id="x", file_name="a")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "adapter_id only",
        ),
        ([pb.UploadAdapterRequest(adapter_id="x")], grpc.StatusCode.INVALID_ARGUMENT, "no files"),
        (
            [pb.UploadAdapterRequest(adapter_id="x"), _chunk(CONFIG), _chunk(WEIGHTS), _chunk(CONFIG)],
            grpc.StatusCode.INVALID_ARGUMENT,
            "two parts",
        ),
        (
            [pb.UploadAdapterRequest(adapter_id="x"), _chunk("")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "file_name",
        ),
        (
            [pb.UploadAdapterRequest(adapter_id="x"), pb.UploadAdapterRequest(adapter_id="y", file_name="a")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "first UploadAdapterRequest only",
        ),
        (
            [pb.UploadAdapterRequest(adapter_id="x"), _chunk("weights.pt")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "pickle files are never accepted",
        ),
        (
            [pb.UploadAdapterRequest(adapter_id="x"), _chunk("../adapter_config.json")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "path separators",
        ),
        (
            [pb.UploadAdapterRequest(adapter_id="../x"), _chunk("a")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "not valid",
        ),
        (
            [pb.UploadAdapterRequest(adapter_id="x@v2"), _chunk("a")],
            grpc.StatusCode.INVALID_ARGUMENT,
            "no @version",
        ),
    ],
)
def test_malformed_upload_streams_are_refused(
    served: Served, messages: list[pb.UploadAdapterRequest], code: grpc.StatusCode, match: str
) -> None:
    error = _upload_raw(served, messages)
    assert error.code() == code and match in error.details(), error.details()
    assert not served.admin.adapters


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({}, InvalidArgument, "adapter_config.json is missing"),
        ({"config": b"{not json"}, InvalidArgument, "not JSON"),
        ({"config": b'{"base_model": "another-model"}'}, FailedPrecondition, "another base model"),
        ({"weights": b"w" * (QUOTA_BYTES + 1)}, ResourceExhausted, "quota"),
    ],
)
def test_admin_errors_keep_their_status_and_message(
    served: Served, tmp_path: Path, kwargs: dict[str, bytes], exc: type[PeftServeError], match: str
) -> None:
    peft_dir = tmp_path / "a"
    peft_dir.mkdir()
    (peft_dir / "adapter_model.safetensors").write_bytes(kwargs.get("weights", b"w"))
    if "config" in kwargs or "weights" in kwargs:
        (peft_dir / "adapter_config.json").write_bytes(kwargs.get("config", b"{}"))
    with Client(served.address, timeout=5) as client, pytest.raises(exc, match=match):
        client.upload_adapter(peft_dir, "x")


@pytest.mark.parametrize(
    ("failure", "exc"),
    [
        (errors.AdapterNotFound("adapter 'default/x' not found"), NotFound),
        (errors.InvalidRequest("bad"), InvalidArgument),
        (errors.CapacityExceeded("no free slot"), ResourceExhausted),
        (RuntimeError("disk on fire at /secret/path"), InternalError),
    ],
)
def test_every_unary_rpc_maps_admin_failures(
    served: Served, failure: Exception, exc: type[PeftServeError]
) -> None:
    served.admin.fail_with = failure
    calls = {
        "load": lambda c: c.load_adapter("x"),
        "unload": lambda c: c.unload_adapter("x"),
        "delete": lambda c: c.delete_adapter("x"),
        "get": lambda c: c.get_adapter("x"),
        "list": lambda c: c.list_adapters(),
    }
    with Client(served.address, timeout=5) as client:
        for name, call in calls.items():
            with pytest.raises(exc) as info:
                call(client)
            assert "/secret/path" not in info.value.message, name


def test_bad_ids_are_invalid_before_the_admin_is_called(served: Served) -> None:
    with Client(served.address, timeout=5) as client:
        for bad in ("../etc", "a/b/c", "/abs", "UPPER", "x@latest", "a\x00b", "-x", "x" * 65):
            with pytest.raises(InvalidArgument, match="not valid"):
                client.get_adapter(bad)
        with pytest.raises(InvalidArgument, match="must not be empty"):
            client.unload_adapter("")
        with pytest.raises(InvalidArgument, match="no @version"):
            client.load_adapter("x@v1")
    assert served.admin.calls == []


def test_uploads_beyond_the_concurrency_limit_are_resource_exhausted(tmp_path: Path) -> None:
    """Held uploads fill the limit; the next is refused at once, and admitted again once one ends."""
    from peftserve.api.admin_servicer import AdminServicer
    from peftserve.auth import Authenticator

    from .fake_admin import FakeAdmin

    class Aborted(Exception):
        pass

    class Context:
        def invocation_metadata(self) -> tuple:
            return ()

        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise Aborted(code, details)

    files = list(_core.upload_requests("acme/x", _core.adapter_files(write_peft_dir(tmp_path / "x"))))

    async def main() -> None:
        servicer = AdminServicer(FakeAdmin(), Authenticator(), max_concurrent_uploads=2)
        release = asyncio.Event()

        async def held():
            yield files[0]
            await release.wait()
            for request in files[1:]:
                yield request

        async def whole():
            for request in files:
                yield request

        first = asyncio.create_task(servicer.UploadAdapter(held(), Context()))
        second = asyncio.create_task(servicer.UploadAdapter(held(), Context()))
        await asyncio.sleep(0.05)  # both are now waiting for their files
        with pytest.raises(Aborted) as refused:
            await servicer.UploadAdapter(whole(), Context())
        assert refused.value.args[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "2 uploads are already in progress" in refused.value.args[1]
        release.set()
        assert [m.adapter_id for m in await asyncio.gather(first, second)] == ["acme/x", "acme/x"]
        assert (await servicer.UploadAdapter(whole(), Context())).adapter_id == "acme/x"

    asyncio.run(main())
