"""EngineReplica: one AsyncEngine per Ray Serve replica, its adapters multiplexed by id.

Ray routes each request to a replica that holds the request's routing id (routing.routing_id) in its
multiplexed set, whose size is the engine's device adapter slots, as Ray Serve LLM does for vLLM's
LoRA. The replica serves the adapter versions the ingress pinned, learning those committed by other
replicas from the shared store (store_sync), and exports its own Prometheus metrics, the routing's
affinity hits among them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import ray
from prometheus_client import Counter
from ray import serve

from peftserve.api.server import freeze_startup_heap
from peftserve.api.status import code_of
from peftserve.config import EngineConfig
from peftserve.deploy.config import ClusterConfig
from peftserve.deploy.directory import AdapterEvent, ReplicaInfo, get_directory
from peftserve.deploy.store_sync import StoreSync, adapter_lock
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.engine.protocol import AdapterStatus, ModelInfo
from peftserve.engine.request import GenerationRequest, RequestOutput
from peftserve.errors import AdapterNotFound, FailedPrecondition
from peftserve.metrics import RequestTrace, ServerMetrics, start_metrics_server
from peftserve.store import AdapterStore
from peftserve.store.ids import join_id, split_version
from peftserve.store.manifest import AdapterManifest, FileEntry

log = logging.getLogger("ray.serve")
"""Ray Serve's logger: its lines reach the replica's log file and the `peftserve cluster` output."""

EVENT_POLL_S = 0.5
"""How often a replica reads the adapter changes made through other replicas."""


def open_engine(config: EngineConfig) -> tuple[AsyncEngine, StoreSync | None]:
    """The engine of one replica: the shared store opened without cleaning it (others may be writing).

    The same order as one server: the store's versions first, then the `--adapter` folders.
    """
    engine = LLMEngine.create(dataclasses.replace(config, store=None, adapters=()))
    manager = engine.adapters.manager if engine.adapters is not None else None
    if config.store is not None:
        engine.store = AdapterStore(
            config.store, config.max_adapters_per_tenant, config.max_upload_bytes, clean=False
        )
    engine.warmup()
    front = AsyncEngine(engine)
    sync = None
    if manager is not None and engine.store is not None:
        sync = StoreSync(manager, engine.store, front.run_on_engine)
        sync.sync_all()
    for adapter_id, path in config.adapters:
        manager.register(adapter_id, path)
    freeze_startup_heap(lambda: engine.stats().warming)  # as one server does: full collections skip them
    return front, sync


@dataclasses.dataclass
class Resident:
    """What Ray's multiplexing holds per routing id on this replica (the adapter itself is the engine's)."""

    route: str
    requests: int = 0


class EngineReplica:
    """The Ray Serve deployment of the engine (the ingress calls it through a DeploymentHandle)."""

    async def __init__(self, config: ClusterConfig) -> None:
        engine_config = config.server.engine
        self.engine, self.sync = await asyncio.to_thread(open_engine, engine_config)  # seconds: model load
        self.metrics = ServerMetrics(self.engine)
        self.routed = Counter(
            "peftserve_routed_requests",
            "Requests routed here by adapter id; affinity=hit when this replica already held the id.",
            ["affinity"],
            registry=self.metrics.registry,
        )

        async def hold(route: str) -> Resident:
            """Ray's multiplexing loads a routing id here: the engine loads the adapter on first use."""
            return Resident(route)

        self._adopt = serve.multiplexed(max_num_models_per_replica=engine_config.slots)(hold)
        self._grace_s = config.server.grace_s
        self._sync_s = config.store_sync_s
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        node_ip = ray.util.get_node_ip_address()
        http = start_metrics_server(0, self.metrics.registry, host=node_ip)
        metrics_url = f"http://{node_ip}:{http.server_port}/metrics"
        self.info = ReplicaInfo(self.replica_id, os.getpid(), node_ip, metrics_url)
        self._directory = get_directory()
        await self._directory.register.remote(self.info)
        self._seen = 0
        self._background = asyncio.get_running_loop().create_task(self._follow_changes())
        log.info("replica %s serving (pid %d, metrics %s)", self.replica_id, os.getpid(), metrics_url)

    # -- Inference ------------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """The engine's increments of one request whose adapters the ingress pinned to versions."""
        await self._count_route()
        await self._learn_versions(request)
        trace, status = RequestTrace(), grpc.StatusCode.OK
        stream = self.engine.generate(request)
        try:
            async for output in stream:
                trace.observe(output)
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            status = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            status = code_of(exc)
            raise
        finally:
            await stream.aclose()
            self.metrics.record(trace, status.name)

    async def model_info(self) -> ModelInfo:
        """The ingress asks once, at its start."""
        return self.engine.model_info

    async def ready(self) -> str:
        """This replica's id (the ingress's health check)."""
        return self.replica_id

    # -- Adapters -------------------------------------------------------------------------------

    async def commit_upload(
        self, tenant: str, name: str, staged: str, files: tuple[FileEntry, ...]
    ) -> AdapterManifest:
        """Validate and commit an upload the ingress staged in the shared store's .tmp/."""
        async with self._writing(tenant, name):
            manifest = await self._admin().commit_upload(tenant, name, Path(staged), files)
        await self._announce("changed", join_id(tenant, name))
        return manifest

    async def load(self, tenant: str, name: str, pin: bool) -> AdapterStatus:
        await self._refresh(tenant, name)
        return await self._admin().load(tenant, name, pin=pin)

    async def unload(self, tenant: str, name: str) -> AdapterStatus:
        await self._refresh(tenant, name)
        status = await self._admin().unload(tenant, name)
        await self._announce("unload", join_id(tenant, name))
        return status

    async def delete(self, tenant: str, name: str) -> None:
        async with self._writing(tenant, name):
            await self._refresh(tenant, name)
            await self._admin().delete(tenant, name)
        await self._announce("changed", join_id(tenant, name))

    async def get(self, tenant: str, name: str) -> AdapterStatus:
        await self._refresh(tenant, name)
        return await self._admin().get(tenant, name)

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[AdapterStatus], str]:
        if self.sync is not None:
            await self.sync.sync_all_async()
        return await self._admin().list(tenant, page_size, page_token)

    # -- internals ------------------------------------------------------------------------------

    async def _count_route(self) -> None:
        route = serve.get_multiplexed_model_id()
        if route:
            resident = await self._adopt(route)
            self.routed.labels(affinity="hit" if resident.requests else "miss").inc()
            resident.requests += 1

    async def _learn_versions(self, request: GenerationRequest) -> None:
        """Re-read from the store the ids whose pinned version this replica has not seen yet, and those
        it serves from the store that came unpinned: the ingress found no version of them there (deleted
        through another replica a moment ago), so the request gets NOT_FOUND as from one server."""
        if self.sync is None or self.engine.engine.adapters is None:
            return
        registry = self.engine.engine.adapters.manager.registry
        stale = []
        for ref in request.adapters:
            adapter_id, number = split_version(ref.adapter_id)
            try:
                record = registry.lookup(ref.adapter_id)
            except AdapterNotFound:
                stale.append(adapter_id)
                continue
            if number is None and record.store_root is not None:
                stale.append(adapter_id)
        if stale:
            await self.sync.refresh_async(stale)

    async def _refresh(self, tenant: str, name: str) -> None:
        if self.sync is not None:
            await self.sync.refresh_async([join_id(tenant, name)])

    def _writing(self, tenant: str, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """The store's lock of one adapter, across replicas (a no-op without a store)."""
        store = self.engine.engine.store
        return adapter_lock(store, join_id(tenant, name)) if store is not None else contextlib.nullcontext()

    def _admin(self):
        if self.engine.admin is None:
            raise FailedPrecondition("this cluster serves no adapters")
        return self.engine.admin

    async def _announce(self, kind: str, adapter_id: str) -> None:
        self._seen = max(self._seen, await self._directory.publish.remote(kind, adapter_id))

    async def _follow_changes(self) -> None:
        """Apply adapter changes announced by other replicas; rescan the store every store_sync_s."""
        loop = asyncio.get_running_loop()
        next_scan = loop.time() + self._sync_s
        while True:
            await asyncio.sleep(EVENT_POLL_S)
            try:
                seq, events = await self._directory.events_since.remote(self._seen)
                if events is None or loop.time() >= next_scan:
                    next_scan = loop.time() + self._sync_s
                    if self.sync is not None:
                        await self.sync.sync_all_async()
                for event in events or ():
                    await self._apply(event)
                self._seen = seq
            except Exception:  # the directory or the store is briefly unreachable: try again
                log.warning("replica %s: could not follow adapter changes", self.replica_id, exc_info=True)

    async def _apply(self, event: AdapterEvent) -> None:
        if self.sync is None:
            return
        if event.kind == "unload":
            await self.sync.unload(event.adapter_id)
        else:
            await self.sync.refresh_async([event.adapter_id])

    async def __del__(self) -> None:
        """Ray Serve stops the replica after its requests finished (graceful_shutdown_timeout_s)."""
        self._background.cancel()
        with contextlib.suppress(Exception):
            await self._directory.unregister.remote(self.replica_id)
        await self.engine.drain(self._grace_s)
        await asyncio.to_thread(self.engine.shutdown)
