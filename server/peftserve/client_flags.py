"""How the command-line tools reach a running server: API key and TLS, from flags or the environment.

Shared by every command that calls a server (generate, info, health, adapters, train --push).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

API_KEY_ENV = "PEFTSERVE_API_KEY"
TLS_ENV = {"ca_file": "PEFTSERVE_TLS_CA", "cert_file": "PEFTSERVE_TLS_CERT", "key_file": "PEFTSERVE_TLS_KEY"}
"""Environment variables of the TLS files, by SDK argument."""


def add_tls_args(parser: argparse.ArgumentParser) -> None:
    """--tls, --tls-ca, --tls-cert, --tls-key (defaults from PEFTSERVE_TLS_*)."""
    group = parser.add_argument_group("TLS (a server started with --tls-cert)")
    group.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs")
    group.add_argument(
        "--tls-ca",
        dest="ca_file",
        default=os.environ.get(TLS_ENV["ca_file"]),
        metavar="FILE",
        help=f"CA that signed the server's certificate; implies --tls (env {TLS_ENV['ca_file']})",
    )
    group.add_argument(
        "--tls-cert",
        dest="cert_file",
        default=os.environ.get(TLS_ENV["cert_file"]),
        metavar="FILE",
        help=f"this client's certificate, for a server with --tls-client-ca (env {TLS_ENV['cert_file']})",
    )
    group.add_argument(
        "--tls-key",
        dest="key_file",
        default=os.environ.get(TLS_ENV["key_file"]),
        metavar="FILE",
        help=f"the key of --tls-cert (env {TLS_ENV['key_file']})",
    )


def tls_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The SDK's TLS arguments (Client(..., **tls_kwargs(args)))."""
    return {"tls": args.tls, "ca_file": args.ca_file, "cert_file": args.cert_file, "key_file": args.key_file}
