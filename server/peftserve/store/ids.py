"""Adapter ids: '<tenant>/<name>' with an optional '@vN' pin, and the version keys built from them.

The one implementation of the id rule; the API resolves what a caller wrote with ``full_adapter_id``,
the engine and the registry see full ids only. Internally a version is keyed ``<tenant>/<name>@vN``.
"""

from __future__ import annotations

import re

from peftserve.errors import AdapterNotFound, InvalidRequest, quote

ID_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
"""One part of an id (tenant or name): no separators, no leading dot, so never '.', '..' or a path."""
VERSION = re.compile(r"v([1-9][0-9]{0,8})")
DEFAULT_TENANT = "default"
"""The tenant of every caller in local mode (no API keys) and of `serve --adapter NAME=DIR`."""


def check_part(part: object, what: str = "adapter name") -> str:
    """Return part if it matches ID_PART; InvalidRequest naming the rule otherwise."""
    if not isinstance(part, str) or not ID_PART.fullmatch(part):
        raise InvalidRequest(
            f"{what} {quote(part)} is not valid: "
            "1-64 characters of a-z 0-9 . _ - starting with a letter or digit"
        )
    return part


def parse_version(text: str) -> int:
    """'v3' -> 3; InvalidRequest for anything else."""
    match = VERSION.fullmatch(text)
    if match is None:
        raise InvalidRequest(f"version {quote(text)} is not valid: expected v1, v2, ...")
    return int(match.group(1))


def full_adapter_id(text: str, tenant: str, local_mode: bool = False) -> str:
    """The full id '<tenant>/<name>[@vN]' of what a caller of `tenant` wrote ('name' or 't/name', '@vN').

    Another tenant's id is AdapterNotFound with the message of a missing one, unless local_mode (no keys):
    then any tenant may be addressed explicitly.
    """
    check_part(tenant, "tenant")
    if not isinstance(text, str) or not text:
        raise InvalidRequest("adapter id must not be empty")
    base, at, version = text.partition("@")
    if at:
        parse_version(version)
    parts = base.split("/")
    if len(parts) > 2:
        raise InvalidRequest(
            f"adapter id {quote(text)} is not valid: expected name or tenant/name, optionally @vN"
        )
    for part in parts:
        check_part(part, "adapter id part")
    if len(parts) == 1:
        parts = [tenant, parts[0]]
    elif parts[0] != tenant and not local_mode:
        raise AdapterNotFound(f"adapter {quote(text)} not found")
    return "/".join(parts) + (f"@{version}" if at else "")


def join_id(tenant: str, name: str) -> str:
    """'<tenant>/<name>' after checking both parts."""
    return f"{check_part(tenant, 'tenant')}/{check_part(name)}"


def split_id(adapter_id: str) -> tuple[str, str]:
    """(tenant, name) of a full id without version."""
    tenant, _, name = adapter_id.partition("/")
    return tenant, name


def split_version(full_id: str) -> tuple[str, int | None]:
    """('<tenant>/<name>', N or None) of a full id with an optional '@vN'."""
    base, at, version = full_id.partition("@")
    return base, parse_version(version) if at else None


def version_key(adapter_id: str, version: int) -> str:
    """The internal key of one version: '<tenant>/<name>@vN' (slots and caches are keyed by it)."""
    return f"{adapter_id}@v{version}"


def version_name(version: int) -> str:
    """'v3' for 3: the version's folder and its name in manifests."""
    return f"v{version}"
