"""Hand a trained adapter directory to a running server through the SDK (no restart needed there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from peftserve.errors import FailedPrecondition


def require_upload() -> type:
    """The SDK's Client class, if it has `upload_adapter`; checked before training so no run is wasted."""
    from peftserve_client import Client  # grpc only, and only when pushing

    if not callable(getattr(Client, "upload_adapter", None)):
        raise FailedPrecondition(
            "this peftserve_client has no Client.upload_adapter (the server's upload API is not available "
            "in this version), so --push cannot work; train with --out DIR and serve the directory with "
            "`peftserve serve --adapter ID=DIR`"
        )
    return Client


def check_server(address: str, api_key: str | None = None, **tls: Any) -> None:
    """Fail before training if the server cannot be reached (the SDK's own error says why).

    tls: the SDK's TLS arguments (tls, ca_file, cert_file, key_file)."""
    client_class = require_upload()
    with client_class(address, api_key=api_key, **tls) as client:
        client.health()


def push_adapter(
    directory: str | Path, address: str, adapter_id: str, api_key: str | None = None, **tls: Any
) -> Any:
    """Upload `directory` as `adapter_id` with `Client(address).upload_adapter`; returns what it returns."""
    client_class = require_upload()
    with client_class(address, api_key=api_key, **tls) as client:
        return client.upload_adapter(str(directory), adapter_id=adapter_id)
