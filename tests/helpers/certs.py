"""A test CA and certificates made with the openssl command, as the README's three commands make them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2"]


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def make_ca(directory: Path, name: str) -> Issued:
    """A self-signed CA: <name>.pem and <name>.key."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    _openssl(
        ["req", "-x509", *_KEY, "-keyout", key, "-out", cert, "-subj", f"/CN={name}"]
        + ["-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    )
    return Issued(cert, key)


def issue(ca: Issued, directory: Path, name: str, server: bool = False) -> Issued:
    """A certificate signed by ca; a server's names localhost and 127.0.0.1."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    names = ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"] if server else []
    _openssl(
        ["req", "-x509", "-CA", ca.cert, "-CAkey", ca.key, *_KEY, "-keyout", key, "-out", cert]
        + ["-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:FALSE", *names]
    )
    return Issued(cert, key)


def _openssl(args: list[str | Path]) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)
