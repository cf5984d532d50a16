"""Who is calling: the tenant and scopes of the API key in the call metadata, or local mode."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from peftserve.engine.request import TenantLimits
from peftserve.errors import PermissionDenied, Unauthenticated
from peftserve.store.ids import DEFAULT_TENANT

if TYPE_CHECKING:
    from peftserve.auth.keys import KeyRing

API_KEY_HEADER = "x-api-key"
LOCAL_TENANT = DEFAULT_TENANT
"""The tenant of every caller of a server without a keys file."""


class Scope(str, enum.Enum):
    """What a key may do: one scope per gRPC service."""

    INFER = "infer"
    """peftserve.v1.Inference."""
    ADMIN = "admin"
    """peftserve.v1.Adapters."""


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one RPC."""

    tenant: str
    local_mode: bool = False
    """No keys file: every caller is the LOCAL_TENANT and may name any tenant's adapters."""
    limits: TenantLimits | None = None
    """Its key's own per-tenant limits (over the server's defaults), or None."""


LOCAL_CALLER = Caller(LOCAL_TENANT, local_mode=True)


class Authenticator:
    """Turns call metadata into a Caller; raises Unauthenticated or PermissionDenied."""

    def __init__(self, keys: KeyRing | None = None) -> None:
        self._keys = keys

    @property
    def keys(self) -> KeyRing | None:
        return self._keys

    def replace_keys(self, keys: KeyRing) -> None:
        """Use these keys from the next call on (a reloaded keys file); calls under way are not affected.

        A server started without keys stays in local mode: turning authentication on needs a restart.
        """
        if self._keys is None:
            raise ValueError("this server runs in local mode (no keys file); restart it with --keys-file")
        self._keys = keys

    def authorize(self, metadata: Iterable[tuple[str, str | bytes]], scope: Scope) -> Caller:
        """The caller whose key grants scope; without a keys file, the local caller (keys ignored)."""
        if self._keys is None:
            return LOCAL_CALLER
        presented = [value for key, value in metadata if key == API_KEY_HEADER]
        if not presented:
            raise Unauthenticated(f"missing API key: send it as {API_KEY_HEADER} metadata")
        key = presented[0]
        entry = self._keys.verify(key) if len(presented) == 1 and isinstance(key, str) else None
        if entry is None:
            raise Unauthenticated("invalid API key")
        if scope not in entry.scopes:
            raise PermissionDenied(f"this API key lacks the {scope.value!r} scope")
        return Caller(entry.tenant, limits=entry.limits)
