"""Tenants and API keys: the keys file, and the caller of each RPC (plain Python, no grpc)."""

from peftserve.auth.access import API_KEY_HEADER, LOCAL_CALLER, LOCAL_TENANT, Authenticator, Caller, Scope
from peftserve.auth.keys import KeyEntry, KeyRing, parse_scopes

__all__ = [
    "API_KEY_HEADER",
    "LOCAL_CALLER",
    "LOCAL_TENANT",
    "Authenticator",
    "Caller",
    "KeyEntry",
    "KeyRing",
    "Scope",
    "parse_scopes",
]
