"""The keys file stores hashes only; keys verify in constant time; bad files fail loudly at start."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest

from peftserve.auth import KeyRing, Scope, parse_scopes
from peftserve.auth.keys import hash_key, key_id_of
from peftserve.errors import InvalidRequest


def test_added_keys_are_stored_hashed_and_verify(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    ring, key = KeyRing().add("acme", parse_scopes("infer,admin"))
    ring, other = ring.add("globex", [Scope.INFER])
    ring.save(path)
    text = path.read_text()
    secret = key.split("_", 2)[2]  # psk_<id>_<secret>, and the secret may hold underscores too
    assert key not in text and other not in text and secret not in text
    assert hash_key(key) in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    loaded = KeyRing.load(path)
    entry = loaded.verify(key)
    assert entry is not None and (entry.tenant, entry.scopes) == ("acme", {Scope.INFER, Scope.ADMIN})
    assert entry.key_id == key_id_of(key) and entry.created_at
    assert loaded.verify(other).tenant == "globex"


@pytest.mark.parametrize(
    "presented",
    [
        "",
        "nonsense",
        "psk_",
        "psk_zzzzzzzzzzzz_secret",
        "psk_{id}_",
        "psk_{id}_wrong-secret",
        "PSK_{id}_{secret}",
        " psk_{id}_{secret}",
        "psk_{id}_{secret}x",
    ],
)
def test_anything_but_the_exact_key_is_refused(presented: str) -> None:
    ring, key = KeyRing().add("acme", [Scope.INFER])
    _, key_id, secret = key.split("_", 2)
    assert ring.verify(presented.format(id=key_id, secret=secret)) is None
    assert ring.verify(key) is not None


def test_revoked_keys_no_longer_verify() -> None:
    ring, key = KeyRing().add("acme", [Scope.INFER])
    ring, kept = ring.add("acme", [Scope.INFER])
    ring = ring.revoke(key_id_of(key))
    assert ring.verify(key) is None and ring.verify(kept) is not None
    with pytest.raises(InvalidRequest, match="no key with id"):
        ring.revoke("000000000000")


def _entry(**changes: object) -> dict:
    return {"id": "0123456789ab", "sha256": "0" * 64, "tenant": "acme", "scopes": ["infer"], **changes}


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("not json", "not readable JSON"),
        ('{"keys": []}', "version 1"),
        ('{"version": 1, "keys": {}}', "'keys' must be a list"),
        ({"keys": [_entry(id="short")]}, "12 hex digits"),
        ({"keys": [_entry(sha256="the-key-itself")]}, "sha256"),
        ({"keys": [_entry(tenant="../other")]}, "tenant '../other' is not valid"),
        ({"keys": [_entry(scopes=["root"])]}, "scopes must be some of"),
        ({"keys": [_entry(scopes=[])]}, "at least one scope"),
        ({"keys": [_entry(), _entry()]}, "appears twice"),
    ],
)
def test_malformed_keys_files_are_refused(tmp_path: Path, content: str | dict, match: str) -> None:
    path = tmp_path / "keys.json"
    path.write_text(content if isinstance(content, str) else json.dumps({"version": 1, **content}))
    with pytest.raises(InvalidRequest, match=match) as info:
        KeyRing.load(path)
    assert str(path) in str(info.value)


def test_a_missing_keys_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest, match="does not exist"):
        KeyRing.load(tmp_path / "nope.json")


def test_bad_tenant_or_scope_when_adding() -> None:
    with pytest.raises(InvalidRequest, match="tenant"):
        KeyRing().add("Acme Corp", [Scope.INFER])
    with pytest.raises(InvalidRequest, match="scopes"):
        parse_scopes("infer,write")


def test_a_key_may_carry_its_own_tenant_limits(tmp_path: Path) -> None:
    from peftserve.auth import Authenticator
    from peftserve.engine.request import TenantLimits

    path = tmp_path / "keys.json"
    limits = TenantLimits(max_running=4, tokens_per_minute=1000)
    ring, vip = KeyRing().add("acme", [Scope.INFER], limits)
    ring, plain = ring.add("acme", [Scope.INFER])
    ring.save(path)
    saved = json.loads(path.read_text())["keys"]
    assert saved[0]["limits"] == {"max_running": 4, "tokens_per_minute": 1000} and "limits" not in saved[1]
    auth = Authenticator(KeyRing.load(path))
    assert auth.authorize([("x-api-key", vip)], Scope.INFER).limits == limits
    assert auth.authorize([("x-api-key", plain)], Scope.INFER).limits is None

    for bad in ({"max_running": 0}, {"max_running": "4"}, {"burst": 3}, [4]):
        saved[0]["limits"] = bad
        path.write_text(json.dumps({"version": 1, "keys": saved}))
        with pytest.raises(InvalidRequest, match="limits"):
            KeyRing.load(path)
