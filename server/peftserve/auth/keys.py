"""API keys: generated here, stored only as hashes in a JSON keys file, verified in constant time.

A key reads ``psk_<id>_<secret>``: the public 12-hex-digit id finds the entry, and the SHA-256 of the
whole key must match the stored hash. The secret has 256 random bits, so a fast hash is enough (slow
KDFs such as scrypt protect low-entropy passwords, not random keys). The keys file::

    {
      "version": 1,
      "keys": [
        {
          "id": "3f9a2c1d0b7e",
          "sha256": "<hex SHA-256 of the whole key>",
          "tenant": "acme",
          "scopes": ["infer", "admin"],
          "created_at": "2026-01-31T12:00:00+00:00",
          "limits": {"max_queued": 64, "max_running": 16, "tokens_per_minute": 200000}
        }
      ]
    }

``scopes`` holds ``infer`` (the Inference service) and/or ``admin`` (the Adapters service);
``tenant`` follows the adapter id part rule (store/ids.py); ``created_at`` is informational; ``limits``
(optional, each field optional) replaces the server's per-tenant defaults for calls made with this key.
``peftserve keys add`` writes entries; the server reads the file at start and again on SIGHUP.
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from peftserve.auth.access import Scope
from peftserve.engine.request import TenantLimits
from peftserve.errors import InvalidRequest
from peftserve.store.ids import check_part

FORMAT_VERSION = 1
KEY_PREFIX = "psk"
_KEY_ID = re.compile(r"[0-9a-f]{12}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_UNKNOWN_ID_HASH = hashlib.sha256(b"no key has this id").hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    """One key as the keys file stores it: never the key itself."""

    key_id: str
    sha256: str
    """Hex SHA-256 of the whole key."""
    tenant: str
    scopes: frozenset[Scope]
    created_at: str = ""
    limits: TenantLimits | None = None
    """This key's own per-tenant limits (over the server's defaults), or None."""


def hash_key(key: str) -> str:
    """The hex SHA-256 the keys file stores for key."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(taken_ids: Iterable[str] = ()) -> tuple[str, str]:
    """A fresh random key and its id (unique among taken_ids)."""
    taken = set(taken_ids)
    key_id = secrets.token_hex(6)
    while key_id in taken:
        key_id = secrets.token_hex(6)
    return f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}", key_id


def key_id_of(key: str) -> str | None:
    """The id part of a presented key, or None when it is not shaped like one of ours."""
    prefix, _, rest = key.partition("_")
    key_id, sep, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not sep or not secret or not _KEY_ID.fullmatch(key_id):
        return None
    return key_id


class KeyRing:
    """The keys of a keys file, by id."""

    def __init__(self, entries: Iterable[KeyEntry] = ()) -> None:
        self._by_id: dict[str, KeyEntry] = {}
        for entry in entries:
            if entry.key_id in self._by_id:
                raise InvalidRequest(f"keys file: key id {entry.key_id!r} appears twice")
            self._by_id[entry.key_id] = entry

    @property
    def entries(self) -> tuple[KeyEntry, ...]:
        return tuple(self._by_id.values())

    def verify(self, key: str) -> KeyEntry | None:
        """The entry of a valid key, else None; hashes and compares even for unknown ids."""
        key_id = key_id_of(key)
        entry = self._by_id.get(key_id) if key_id is not None else None
        expected = entry.sha256 if entry is not None else _UNKNOWN_ID_HASH
        matches = hmac.compare_digest(hash_key(key), expected)
        return entry if matches and entry is not None else None

    def add(
        self, tenant: str, scopes: Iterable[Scope], limits: TenantLimits | None = None
    ) -> tuple[KeyRing, str]:
        """A ring with one more key for tenant, and that key (the only time it is seen)."""
        key, key_id = new_key(self._by_id)
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        tenant = check_part(tenant, "tenant")
        entry = KeyEntry(key_id, hash_key(key), tenant, parse_scopes(scopes), created, limits)
        return KeyRing([*self._by_id.values(), entry]), key

    def revoke(self, key_id: str) -> KeyRing:
        """A ring without the key of this id."""
        if key_id not in self._by_id:
            raise InvalidRequest(f"no key with id {key_id!r}")
        return KeyRing(e for e in self._by_id.values() if e.key_id != key_id)

    @classmethod
    def load(cls, path: str | Path) -> KeyRing:
        """Read and validate a keys file."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InvalidRequest(f"keys file {path} does not exist") from None
        except (OSError, ValueError) as e:
            raise InvalidRequest(f"keys file {path} is not readable JSON: {e}") from None
        if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
            raise InvalidRequest(f"keys file {path}: expected an object with version {FORMAT_VERSION}")
        keys = data.get("keys")
        if not isinstance(keys, list):
            raise InvalidRequest(f"keys file {path}: 'keys' must be a list")
        try:
            return cls(_entry(item) for item in keys)
        except InvalidRequest as e:
            raise InvalidRequest(f"keys file {path}: {e}") from None

    def save(self, path: str | Path) -> None:
        """Write the keys file atomically, readable by its owner only."""
        path = Path(path)
        keys = [_entry_json(e) for e in self._by_id.values()]
        text = json.dumps({"version": FORMAT_VERSION, "keys": keys}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def parse_scopes(text: str | Iterable[str]) -> frozenset[Scope]:
    """Scopes from 'infer,admin' or from names; at least one."""
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    try:
        scopes = frozenset(Scope(n) for n in names)
    except ValueError:
        valid = ", ".join(s.value for s in Scope)
        raise InvalidRequest(f"scopes must be some of {valid}, got {names}") from None
    if not scopes:
        raise InvalidRequest("a key needs at least one scope")
    return scopes


LIMIT_FIELDS = ("max_queued", "max_running", "tokens_per_minute")


def _entry_json(entry: KeyEntry) -> dict:
    item = {
        "id": entry.key_id,
        "sha256": entry.sha256,
        "tenant": entry.tenant,
        "scopes": sorted(s.value for s in entry.scopes),
        "created_at": entry.created_at,
    }
    if entry.limits is not None:
        item["limits"] = {f: getattr(entry.limits, f) for f in LIMIT_FIELDS if getattr(entry.limits, f)}
    return item


def _limits(value: object) -> TenantLimits | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - set(LIMIT_FIELDS):
        raise InvalidRequest(f"limits must be an object with some of {', '.join(LIMIT_FIELDS)}")
    try:
        return TenantLimits(**value)
    except ValueError as e:
        raise InvalidRequest(f"limits: {e}") from None


def _entry(item: object) -> KeyEntry:
    """A validated entry of the keys file."""
    if not isinstance(item, dict):
        raise InvalidRequest("every key must be an object")
    key_id, digest, scopes = item.get("id"), item.get("sha256"), item.get("scopes")
    if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
        raise InvalidRequest(f"key id must be 12 hex digits, got {key_id!r}")
    if not isinstance(digest, str) or not _SHA256_HEX.fullmatch(digest):
        raise InvalidRequest(f"key {key_id}: sha256 must be 64 lowercase hex digits")
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes):
        raise InvalidRequest(f"key {key_id}: scopes must be a list of names")
    try:
        tenant, parsed = check_part(item.get("tenant"), "tenant"), parse_scopes(scopes)
        limits = _limits(item.get("limits"))
    except InvalidRequest as e:
        raise InvalidRequest(f"key {key_id}: {e}") from None
    created = item.get("created_at", "")
    return KeyEntry(key_id, digest, tenant, parsed, created if isinstance(created, str) else "", limits)
