"""Call metadata ⇒ Caller: local mode without keys; UNAUTHENTICATED / PERMISSION_DENIED with keys."""

from __future__ import annotations

import pytest

from peftserve.auth import LOCAL_CALLER, Authenticator, Caller, KeyRing, Scope
from peftserve.errors import PermissionDenied, Unauthenticated


@pytest.fixture
def keys() -> tuple[Authenticator, str, str]:
    ring, both = KeyRing().add("acme", [Scope.INFER, Scope.ADMIN])
    ring, infer_only = ring.add("globex", [Scope.INFER])
    return Authenticator(ring), both, infer_only


def test_without_keys_every_caller_is_the_local_tenant() -> None:
    auth = Authenticator()
    assert auth.authorize((), Scope.ADMIN) == LOCAL_CALLER == Caller("default", local_mode=True)
    assert auth.authorize((("x-api-key", "anything"),), Scope.INFER) == LOCAL_CALLER


def test_a_valid_key_gives_its_tenant(keys: tuple[Authenticator, str, str]) -> None:
    auth, both, infer_only = keys
    metadata = (("user-agent", "test"), ("x-api-key", both))
    assert auth.authorize(metadata, Scope.ADMIN) == Caller("acme", local_mode=False)
    assert auth.authorize((("x-api-key", infer_only),), Scope.INFER).tenant == "globex"


def test_missing_unknown_or_repeated_keys_are_unauthenticated(keys: tuple[Authenticator, str, str]) -> None:
    auth, both, _ = keys
    with pytest.raises(Unauthenticated, match="missing API key"):
        auth.authorize((("authorization", both),), Scope.INFER)
    for metadata in ((("x-api-key", both + "x"),), (("x-api-key", both), ("x-api-key", both))):
        with pytest.raises(Unauthenticated, match="invalid API key"):
            auth.authorize(metadata, Scope.INFER)


def test_a_key_without_the_scope_is_permission_denied(keys: tuple[Authenticator, str, str]) -> None:
    auth, _, infer_only = keys
    with pytest.raises(PermissionDenied, match="'admin' scope"):
        auth.authorize((("x-api-key", infer_only),), Scope.ADMIN)


def test_replaced_keys_apply_to_the_next_call_and_local_mode_stays_local() -> None:
    ring, old = KeyRing().add("acme", [Scope.INFER])
    auth = Authenticator(ring)
    ring2, new = KeyRing().add("globex", [Scope.INFER])
    auth.replace_keys(ring2)
    assert auth.authorize([("x-api-key", new)], Scope.INFER) == Caller("globex")
    with pytest.raises(Unauthenticated):
        auth.authorize([("x-api-key", old)], Scope.INFER)
    with pytest.raises(ValueError, match="local mode"):
        Authenticator().replace_keys(ring2)
