"""The id rule shared by the API and the engine: full ids, tenants, versions, the strings refused."""

from __future__ import annotations

import pytest

from peftserve.errors import AdapterNotFound, InvalidRequest
from peftserve.store.ids import full_adapter_id, join_id, split_version, version_key

BAD = [
    "",
    "..",
    "../etc",
    "a/../b",
    "/etc/passwd",
    "model/",
    " ..",
    "UPPER",
    "a//b",
    ".hidden",
    "a\\b",
    "a\0b",
    "%2e%2e",
    "\uff0e\uff0e",  # full-width dots
    "x" * 65,
    "a/b/c",
    "sp ace",
    "a@",
    "a@v0",
    "a@1",
    "a@v1@v2",
]


@pytest.mark.parametrize("text", BAD)
def test_refused_ids_are_invalid(text: str) -> None:
    with pytest.raises(InvalidRequest):
        full_adapter_id(text, "acme")


@pytest.mark.parametrize("text", ["model..1", "a", "x" * 64, "a.b_c-d", "0lora"])
def test_accepted_names(text: str) -> None:
    assert full_adapter_id(text, "acme") == f"acme/{text}"


def test_tenant_scoping_and_versions() -> None:
    assert full_adapter_id("lora", "acme") == "acme/lora"
    assert full_adapter_id("acme/lora@v3", "acme") == "acme/lora@v3"
    with pytest.raises(AdapterNotFound) as other:
        full_adapter_id("globex/lora", "acme")
    assert str(other.value) == "adapter 'globex/lora' not found"  # the message of a missing id
    assert full_adapter_id("globex/lora", "default", local_mode=True) == "globex/lora"
    with pytest.raises(InvalidRequest):
        full_adapter_id("lora", "Bad Tenant")
    assert split_version("acme/lora@v12") == ("acme/lora", 12)
    assert split_version("acme/lora") == ("acme/lora", None)
    assert version_key("acme/lora", 2) == "acme/lora@v2"
    assert join_id("acme", "lora") == "acme/lora"
    with pytest.raises(InvalidRequest):
        join_id("acme", "../lora")
