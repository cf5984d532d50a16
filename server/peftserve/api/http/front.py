"""What every HTTP route shares: the engine, the keys, metrics, health; the caller of a request."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.datastructures import Headers

from peftserve.api.health import ServingHealth
from peftserve.auth import API_KEY_HEADER, Authenticator, Caller, Scope
from peftserve.engine.protocol import AdapterAdmin, EngineClient
from peftserve.errors import Unauthenticated
from peftserve.metrics import ServerMetrics


def presented_keys(headers: Headers) -> list[tuple[str, str]]:
    """The API key of a request as call metadata: `Authorization: Bearer KEY`, or an x-api-key header."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return [(API_KEY_HEADER, token.strip())]
    return [(API_KEY_HEADER, value) for value in headers.getlist(API_KEY_HEADER)]


@dataclass
class HttpFront:
    """The same engine, key ring, metrics and health as the gRPC servicers, seen from HTTP routes."""

    engine: EngineClient
    auth: Authenticator
    metrics: ServerMetrics
    health: ServingHealth
    admin: AdapterAdmin | None
    max_upload_bytes: int
    started_at: int = field(default_factory=lambda: int(time.time()))
    """Unix time the app was built: the base model's `created` in /v1/models."""

    def caller(self, headers: Headers, scope: Scope) -> Caller:
        """The caller whose key grants scope; any key (or none) in local mode, as over gRPC."""
        keys = presented_keys(headers)
        if self.auth.keys is not None and not keys:
            raise Unauthenticated("missing API key: send it as the header Authorization: Bearer <key>")
        return self.auth.authorize(keys, scope)
