"""Adapter ids as a caller writes them ⇒ the full ids the engine and the adapter admin take."""

from __future__ import annotations

from peftserve.auth import Caller
from peftserve.errors import InvalidRequest, quote
from peftserve.store.ids import full_adapter_id, split_id


def resolve(text: str, caller: Caller) -> str:
    """The full id (version pin kept) of an adapter a generation request names."""
    return full_adapter_id(text, caller.tenant, caller.local_mode)


def admin_target(text: str, caller: Caller) -> tuple[str, str]:
    """(tenant, name) of the adapter an admin call names; admin calls act on an adapter, not a version."""
    full = resolve(text, caller)
    if "@" in full:
        raise InvalidRequest(f"adapter id {quote(text)}: admin calls take no @version")
    return split_id(full)
