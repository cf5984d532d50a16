"""The server's TLS material, one source for both listeners, re-read on SIGHUP.

gRPC takes it through dynamic server credentials: grpc asks `_fetch` at each new connection and gets
a new configuration once after a reload. HTTP (uvicorn, and the metrics port) listens with an SSLContext
whose SNI callback hands every new connection the current context, so a reload replaces the certificate,
the key and the client CA together (SSLContext cannot forget a CA once loaded, so the context is rebuilt,
not mutated). Connections already open keep what they negotiated.
"""

from __future__ import annotations

import logging
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from peftserve.config import TlsConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Material:
    """What the files held at one read: PEM bytes for gRPC, a checked SSLContext for HTTP."""

    cert: bytes
    key: bytes
    client_ca: bytes | None
    context: ssl.SSLContext


def _read(config: TlsConfig) -> _Material:
    """Read and check the files: the key must match the certificate. ValueError says which file failed."""
    paths = {"certificate": config.cert_file, "key": config.key_file}
    if config.client_ca_file:
        paths["client CA"] = config.client_ca_file
    data = {}
    for what, path in paths.items():
        try:
            data[what] = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"TLS {what} file {path}: {e.strerror or e}") from None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except (ssl.SSLError, OSError) as e:
        raise ValueError(
            f"TLS certificate {config.cert_file} and key {config.key_file} do not load as a pair: {e}"
        ) from None
    if "client CA" in data:
        try:
            context.load_verify_locations(cadata=data["client CA"].decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as e:
            raise ValueError(
                f"TLS client CA file {config.client_ca_file} holds no PEM certificate: {e}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return _Material(data["certificate"], data["key"], data.get("client CA"), context)


def _grpc_configuration(material: _Material) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(material.key, material.cert)], root_certificates=material.client_ca
    )


class ServerTls:
    """TLS of the gRPC and HTTP listeners from one TlsConfig; reload() re-reads its files for both."""

    def __init__(self, config: TlsConfig) -> None:
        self.config = config
        self._material = _read(config)
        self._lock = threading.Lock()
        self._grpc_pending: grpc.ServerCertificateConfiguration | None = None
        """A configuration gRPC has not picked up yet (set by reload, taken by _fetch)."""

    @property
    def mutual(self) -> bool:
        """Clients must present a certificate signed by the client CA."""
        return self._material.client_ca is not None

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials for add_secure_port that follow reload()."""
        return grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(self._material), self._fetch, require_client_authentication=self.mutual
        )

    def ssl_context(self) -> ssl.SSLContext:
        """The listening context of the HTTP server: each new connection gets the current context."""
        return self.follow(self._material.context)

    def follow(self, listening: ssl.SSLContext) -> ssl.SSLContext:
        """Make the connections a listening context accepts use the current material (after reloads)."""
        listening.sni_callback = self._use_current
        return listening

    def reload(self) -> None:
        """Re-read the files; on any error (ValueError) the material in use stays."""
        material = _read(self.config)
        with self._lock:
            self._material = material
            self._grpc_pending = _grpc_configuration(material)

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's question at each new connection (on its own threads): None keeps the current one."""
        with self._lock:
            pending, self._grpc_pending = self._grpc_pending, None
        return pending

    def _use_current(self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        """Called at every ClientHello, SNI or not: the connection switches to the current context."""
        connection.context = self._material.context
