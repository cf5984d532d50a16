"""`peftserve cluster`: the serve flags that apply, plus where Ray runs and how replicas are sized.

Imports ray only when the command runs, so the rest of the CLI works without the `ray` extra.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
from collections.abc import Callable
from pathlib import Path

from peftserve.config import ServerConfig
from peftserve.deploy.config import ClusterConfig
from peftserve.errors import InvalidRequest


def add_cluster_parser(
    commands: argparse._SubParsersAction, add_serve_flags: Callable[[argparse.ArgumentParser], None]
) -> None:
    """Register `cluster`: add_serve_flags adds the flags it shares with `serve`."""
    cluster = commands.add_parser(
        "cluster",
        help="serve N replicas behind Ray Serve's gRPC and HTTP proxies, each request routed to a"
        " replica holding its adapter (needs peftserve[ray])",
    )
    add_serve_flags(cluster)
    defaults = ClusterConfig()
    cluster.add_argument("--replicas", type=int, default=defaults.replicas, help="engine replicas")
    cluster.add_argument(
        "--ray-address",
        default=None,
        help="join this Ray cluster ('auto', ray://HOST:10001, ...); default: start a local one",
    )
    cluster.add_argument(
        "--replica-cpus", type=float, default=defaults.replica_cpus, help="CPUs Ray reserves per replica"
    )
    cluster.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (default: 1 with cuda)"
    )
    cluster.add_argument(
        "--max-ongoing-requests",
        type=int,
        default=None,
        help="requests Ray lets into one replica at once (default: twice --max-running)",
    )
    cluster.add_argument(
        "--ingress-replicas", type=int, default=defaults.ingress_replicas, help="replicas of the ingress"
    )
    cluster.add_argument(
        "--store-sync-s",
        type=float,
        default=defaults.store_sync_s,
        help="each replica rescans the shared store this often",
    )
    cluster.set_defaults(run=_cmd_cluster)


def free_port(host: str) -> int:
    """A port nothing listens on now (Ray's proxy needs a number, not 0)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _absolute(server: ServerConfig) -> ServerConfig:
    """Paths as the replicas must see them: absolute, whatever their working directory."""
    engine = server.engine

    def resolve(path: str) -> str:
        return str(Path(path).resolve()) if Path(path).exists() else path

    engine = dataclasses.replace(
        engine,
        model=resolve(engine.model) if engine.model != "default" else engine.model,
        store=str(Path(engine.store).resolve()) if engine.store else None,
        adapters=tuple((adapter_id, resolve(path)) for adapter_id, path in engine.adapters),
    )
    port = server.port or free_port(server.host)
    return dataclasses.replace(server, engine=engine, port=port)


def _cmd_cluster(args: argparse.Namespace) -> int:
    from peftserve.auth import KeyRing
    from peftserve.cli import _server_config, configure_logging

    configure_logging(args.log_level)
    try:
        keys = KeyRing.load(args.keys_file) if args.keys_file else None
        server = _absolute(_server_config(args))
        if server.tls is not None:
            raise InvalidRequest(
                "--tls-* are not served through Ray Serve's proxies; terminate TLS in front of the cluster"
                " (a load balancer or ingress controller)"
            )
        gpus = args.replica_gpus
        if gpus is None:
            gpus = 1.0 if server.engine.device.startswith("cuda") else 0.0
        config = ClusterConfig(
            server=server,
            replicas=args.replicas,
            ray_address=args.ray_address,
            http_port=server.http_port or free_port(server.host),
            replica_cpus=args.replica_cpus,
            replica_gpus=gpus,
            max_ongoing_requests=args.max_ongoing_requests,
            ingress_replicas=args.ingress_replicas,
            store_sync_s=args.store_sync_s,
        )
    except InvalidRequest as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        from peftserve.deploy.cluster import run_cluster
    except ImportError as e:
        print(f"error: {e}; install the extra: pip install 'peftserve[ray]'", file=sys.stderr)
        return 2
    run_cluster(config, keys)
    return 0
