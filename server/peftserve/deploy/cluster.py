"""`peftserve cluster`: start or join Ray, deploy the ingress and N engine replicas, serve until a signal.

Ray Serve's gRPC proxy listens on --port and calls the ingress by RPC name; its HTTP proxy listens on
--http-port and calls the ingress's ASGI app, the OpenAI-compatible API. The ingress routes each
request with Ray's model multiplexing to an engine replica. SIGTERM or Ctrl-C drains: health turns
NOT_SERVING, new requests get UNAVAILABLE (503 over HTTP), requests in flight get --grace-s to finish,
then Serve and (a Ray started here) Ray stop.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import ray
from ray import serve
from ray.serve.config import HTTPOptions, gRPCOptions

from peftserve.auth import KeyRing
from peftserve.deploy.config import APP_NAME, ClusterConfig
from peftserve.deploy.directory import DIRECTORY_NAME, NAMESPACE, ClusterDirectory
from peftserve.deploy.federation import cluster_registry
from peftserve.deploy.ingress import Ingress
from peftserve.deploy.replica import EngineReplica
from peftserve.metrics import start_metrics_server
from peftserve.store import AdapterStore

log = logging.getLogger(__name__)

SERVICER_FUNCTIONS = [
    "peftserve_client._proto.peftserve_pb2_grpc.add_InferenceServicer_to_server",
    "peftserve_client._proto.peftserve_pb2_grpc.add_AdaptersServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
"""What Ray's gRPC proxy serves; it calls the ingress method named like each RPC."""
SHUTDOWN_POLL_S = 0.1
"""How often a stopping cluster asks whether every ingress replica has drained."""
LAST_BYTES_S = 0.5
"""Time for the proxies to send the ends of the last responses (a stream's [DONE], its status) before
Serve stops them."""
REPLICA_STOP_POLL_S = 0.2
"""How often a replica Serve is stopping checks that its last requests ended (Ray's default: 2 s)."""


def build_app(config: ClusterConfig, keys: KeyRing | None) -> serve.Application:
    """The Serve application: the ingress bound to a handle of the engine replicas."""
    engine = config.server.engine
    grace_s = config.server.grace_s
    replicas = serve.deployment(
        EngineReplica,
        name="Engine",
        num_replicas=config.replicas,
        max_ongoing_requests=config.ongoing_limit,
        max_queued_requests=engine.max_queue,
        graceful_shutdown_timeout_s=grace_s,
        graceful_shutdown_wait_loop_s=REPLICA_STOP_POLL_S,
        ray_actor_options={"num_cpus": config.replica_cpus, "num_gpus": config.replica_gpus},
    )
    ingress = serve.deployment(
        Ingress,
        name="Ingress",
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.replicas * config.ongoing_limit + engine.max_queue,
        graceful_shutdown_timeout_s=grace_s,
        graceful_shutdown_wait_loop_s=REPLICA_STOP_POLL_S,
        ray_actor_options={"num_cpus": 0},
    )
    return ingress.bind(replicas.bind(config), keys, engine)


def run_cluster(config: ClusterConfig, keys: KeyRing | None) -> None:
    """Serve until SIGTERM or SIGINT, then drain and tear down (see the module docstring)."""
    server = config.server
    if config.ray_address is None:
        ray.init(namespace=NAMESPACE, _node_ip_address=server.host, include_dashboard=False)
    else:
        ray.init(address=config.ray_address, namespace=NAMESPACE)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    try:
        directory = ClusterDirectory.options(name=DIRECTORY_NAME, namespace=NAMESPACE).remote()
        if server.engine.store is not None:  # leftovers of interrupted uploads, before any replica writes
            AdapterStore(server.engine.store)
        serve.start(
            http_options=HTTPOptions(host=server.host, port=config.http_port),
            grpc_options=gRPCOptions(port=server.port, grpc_servicer_functions=SERVICER_FUNCTIONS),
        )
        serve.run(build_app(config, keys), name=APP_NAME, route_prefix="/")
        if server.metrics_port is not None:
            http = start_metrics_server(server.metrics_port, cluster_registry(directory), host=server.host)
            log.info("metrics on http://%s:%d/metrics", server.host, http.server_port)
        log.info("OpenAI-compatible HTTP API on http://%s:%d/v1", server.host, config.http_port)
        log.info(  # the line `peftserve serve` logs: tools waiting for it work with both
            "peftserve serving %s on %s:%d (%d replicas)",
            server.engine.model,
            server.host,
            server.port,
            config.replicas,
        )
        while not stopping.wait(0.5):
            pass
        log.info("draining: up to %.1f s for in-flight requests", server.grace_s)
        ray.get(directory.drain.remote())
        deadline = time.monotonic() + server.grace_s
        while time.monotonic() < deadline:
            if ray.get(directory.drained_ingresses.remote()) >= config.ingress_replicas:
                break
            time.sleep(SHUTDOWN_POLL_S)
        time.sleep(LAST_BYTES_S)
        serve.shutdown()  # stops the proxies at once, then the replicas
    finally:
        ray.shutdown()
        log.info("peftserve cluster stopped")
