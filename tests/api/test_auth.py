"""API keys on a real server: every RPC authenticates, scopes gate services, tenants are isolated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from peftserve_client import Client, NotFound, PeftServeError, PermissionDenied, Unauthenticated
from peftserve_client._proto import peftserve_pb2 as pb

from .conftest import Served
from .fake_admin import write_peft_dir

_METHODS = [
    method for name in ("Inference", "Adapters") for method in pb.DESCRIPTOR.services_by_name[name].methods
]


def _raw_call(address: str, method: MethodDescriptor, api_key: str | None) -> grpc.StatusCode:
    """Call any method with an empty request (auth comes first, so its content never matters)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    metadata = (("x-api-key", api_key),) if api_key else ()
    with grpc.insecure_channel(address) as channel:
        try:
            if method.client_streaming:
                channel.stream_unary(path)(iter([b""]), metadata=metadata, timeout=5)
            elif method.server_streaming:
                list(channel.unary_stream(path)(b"", metadata=metadata, timeout=5))
            else:
                channel.unary_unary(path)(b"", metadata=metadata, timeout=5)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


@pytest.mark.parametrize("method", _METHODS, ids=lambda m: m.name)
def test_every_rpc_needs_a_valid_key_with_its_scope(keyed: Served, method: MethodDescriptor) -> None:
    assert _raw_call(keyed.address, method, None) == grpc.StatusCode.UNAUTHENTICATED
    assert _raw_call(keyed.address, method, "psk_000000000000_forged") == grpc.StatusCode.UNAUTHENTICATED
    wrong_scope = "acme-admin" if method.containing_service.name == "Inference" else "acme-infer"
    assert _raw_call(keyed.address, method, keyed.api_keys[wrong_scope]) == grpc.StatusCode.PERMISSION_DENIED
    assert keyed.engine.requests == [] and keyed.admin.calls == []


def test_the_sdk_raises_the_auth_exceptions_with_messages(keyed: Served) -> None:
    with Client(keyed.address, timeout=5) as client, pytest.raises(Unauthenticated, match="x-api-key"):
        client.generate("hi", max_new_tokens=1)
    with Client(keyed.address, timeout=5, api_key="not-a-key") as client:
        with pytest.raises(Unauthenticated, match="invalid API key"):
            client.list_adapters()
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["acme-infer"]) as client:
        assert client.generate("hi", max_new_tokens=2).text == "hi"
        with pytest.raises(PermissionDenied, match="'admin' scope"):
            client.list_adapters()


def test_health_and_reflection_stay_open(keyed: Served) -> None:
    with Client(keyed.address, timeout=5) as client:
        assert client.health() == "NOT_SERVING"
    with grpc.insecure_channel(keyed.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in response.list_services_response.service}
    assert {"peftserve.v1.Inference", "peftserve.v1.Adapters"} <= names


def test_names_resolve_in_the_callers_tenant(keyed: Served) -> None:
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["acme"]) as client:
        client.generate("hi", adapter_id="lora-a", max_new_tokens=1)
        client.generate("hi", adapters={"acme/lora-a": 0.5}, max_new_tokens=1)
    assert [r.adapters[0].adapter_id for r in keyed.engine.requests] == ["acme/lora-a", "acme/lora-a"]


def _error(call: Callable[..., object], *args: object) -> PeftServeError:
    with pytest.raises(PeftServeError) as info:
        call(*args)
    return info.value


def test_generating_with_another_tenants_adapter_is_not_found(keyed: Served) -> None:
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["acme"]) as client:
        theirs = _error(lambda: client.generate("hi", adapter_id="globex/lora-g"))
        missing = _error(lambda: client.generate("hi", adapter_id="acme/lora-g"))
        in_mixture = _error(lambda: client.generate("hi", adapters={"lora-a": 0.5, "globex/lora-g": 0.5}))
    assert isinstance(theirs, NotFound) and isinstance(missing, NotFound) and isinstance(in_mixture, NotFound)
    assert theirs.message.replace("globex/", "acme/") == missing.message
    assert in_mixture.message == theirs.message
    assert all(r.adapters[0].adapter_id != "globex/lora-g" for r in keyed.engine.requests)


def test_another_tenants_adapter_looks_missing_to_every_admin_call(keyed: Served, tmp_path: Path) -> None:
    peft_dir = write_peft_dir(tmp_path / "a")
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["globex"]) as globex:
        globex.upload_adapter(peft_dir, "secret")
    calls: dict[str, Callable[[Client, str], object]] = {
        "get": lambda c, i: c.get_adapter(i),
        "load": lambda c, i: c.load_adapter(i, pin=True),
        "unload": lambda c, i: c.unload_adapter(i),
        "delete": lambda c, i: c.delete_adapter(i),
        "upload": lambda c, i: c.upload_adapter(peft_dir, i),
    }
    with Client(keyed.address, timeout=5, api_key=keyed.api_keys["acme"]) as acme:
        for name, call in calls.items():
            theirs = _error(call, acme, "globex/secret")
            if name != "upload":  # uploading creates the adapter in one's own tenant
                missing = _error(call, acme, "acme/secret")
                assert (missing.code, missing.message) == ("NOT_FOUND", "adapter 'acme/secret' not found")
            assert (theirs.code, theirs.message) == ("NOT_FOUND", "adapter 'globex/secret' not found"), name
        assert [s.adapter_id for s in acme.iter_adapters()] == []
        acme.upload_adapter(peft_dir, "mine")
        assert [s.adapter_id for s in acme.iter_adapters()] == ["acme/mine"]
    assert all(tenant != "globex" for _, tenant, _ in keyed.admin.calls[1:])
    assert keyed.admin.adapters["globex", "secret"].manifest.version == "v1"
