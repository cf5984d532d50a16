"""The engine replicas behind a DeploymentHandle, as the EngineClient and AdapterAdmin the fronts take.

So the ingress runs the same gRPC servicers and HTTP app as one server (auth, id resolution, upload
limits, error mapping), and only this module knows that the engine is elsewhere: it pins versions,
picks the routing id, and turns Ray's failures into peftserve errors. Text work (tokenize, token
texts, chat templates) runs on the ingress's own copy of the model's tokenizer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import replace
from typing import TypeVar

from ray.serve.handle import DeploymentHandle
from transformers import PreTrainedTokenizerBase

from peftserve.adapters.admin import receive_upload
from peftserve.deploy.routing import VersionPins, routing_id
from peftserve.deploy.status import as_peftserve_error
from peftserve.engine.protocol import AdapterStatus, FileChunks, ModelInfo
from peftserve.engine.request import GenerationRequest, RequestOutput
from peftserve.errors import FailedPrecondition, Unavailable
from peftserve.model.chat import render_chat
from peftserve.model.loader import resolve_model_dir
from peftserve.model.text import encode, load_tokenizer, token_strings
from peftserve.store import AdapterStore
from peftserve.store.ids import join_id
from peftserve.store.manifest import AdapterManifest

T = TypeVar("T")


async def _remote(call: Awaitable[T]) -> T:
    """The result of a replica call; Ray's failures raised as peftserve errors."""
    try:
        return await call
    except Exception as exc:
        raise as_peftserve_error(exc) from None


class RemoteEngine:
    """EngineClient over the engine replicas: generation on a replica, text on the ingress's tokenizer."""

    def __init__(
        self,
        replicas: DeploymentHandle,
        pins: VersionPins,
        store: AdapterStore | None,
        tokenizer: PreTrainedTokenizerBase,
        model_info: ModelInfo,
    ) -> None:
        self._replicas = replicas
        self._pins = pins
        self._tokenizer = tokenizer
        self._model_info = model_info
        self.admin = RemoteAdmin(replicas, store)
        self.draining = False
        """Set when the cluster stops: new requests are UNAVAILABLE, as on a draining server."""
        self.in_flight = 0
        """Generations let in and not yet ended (the drain waits for them)."""

    @classmethod
    async def connect(
        cls, replicas: DeploymentHandle, pins: VersionPins, store: AdapterStore | None, model: str
    ) -> RemoteEngine:
        """Load the tokenizer of model (the served 'default' or directory) and ask a replica for its info.

        Waits for the first replica to load the model (Ray queues the call until one is up).
        """
        directory, _ = await asyncio.to_thread(resolve_model_dir, model)
        tokenizer = await asyncio.to_thread(load_tokenizer, directory)
        info = await _remote(replicas.model_info.remote())
        # Without prefix-cache counters: each replica has its own cache, one replica's are not the cluster's.
        return cls(replicas, pins, store, tokenizer, replace(info, prefix_cache=None))

    @property
    def model_info(self) -> ModelInfo:
        return self._model_info

    def tokenize(self, text: str) -> list[int]:
        return encode(self._tokenizer, text)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return token_strings(self._tokenizer, token_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        return render_chat(self._tokenizer, messages)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        """Pinned to the store's versions, routed by the heaviest adapter, streamed back.

        Closing the stream early (a client gone, a cancelled call) cancels the request on its replica.
        """
        if self.draining:
            raise Unavailable("the cluster is shutting down; retry shortly")
        request = self._pins.pin(request)
        route = routing_id(request.adapters)
        stream = self._replicas.options(stream=True, multiplexed_model_id=route).generate.remote(request)
        finished = False
        self.in_flight += 1
        try:
            async for output in stream:
                finished = output.finished
                yield output
        except Exception as exc:
            finished = True
            raise as_peftserve_error(exc) from None
        finally:
            self.in_flight -= 1
            if not finished:  # the caller went away: the replica aborts the request
                stream.cancel()

    async def ready(self) -> str:
        """The id of a replica that answered."""
        return await _remote(self._replicas.ready.remote())


class RemoteAdmin:
    """AdapterAdmin over the replicas: each call goes to a replica that holds the adapter, if one does."""

    def __init__(self, replicas: DeploymentHandle, store: AdapterStore | None) -> None:
        self._replicas = replicas
        self._store = store
        """The shared store: uploads are staged in its .tmp/ here, then committed by a replica."""

    def _holder(self, tenant: str, name: str) -> DeploymentHandle:
        return self._replicas.options(multiplexed_model_id=join_id(tenant, name))

    async def upload(self, tenant: str, name: str, files: FileChunks) -> AdapterManifest:
        if self._store is None:
            raise FailedPrecondition(
                "this cluster runs without an adapter store (--store); uploads are disabled"
            )
        self._store.check_quota(tenant, name)
        staged, entries = await receive_upload(self._store, files)
        try:
            call = self._holder(tenant, name).commit_upload.remote(tenant, name, str(staged.folder), entries)
            return await _remote(call)
        finally:
            await asyncio.to_thread(staged.discard)  # a no-op once a replica committed it

    async def load(self, tenant: str, name: str, pin: bool = False) -> AdapterStatus:
        return await _remote(self._holder(tenant, name).load.remote(tenant, name, pin))

    async def unload(self, tenant: str, name: str) -> AdapterStatus:
        return await _remote(self._holder(tenant, name).unload.remote(tenant, name))

    async def delete(self, tenant: str, name: str) -> None:
        await _remote(self._holder(tenant, name).delete.remote(tenant, name))

    async def list(self, tenant: str, page_size: int, page_token: str) -> tuple[list[AdapterStatus], str]:
        return await _remote(self._replicas.list.remote(tenant, page_size, page_token))

    async def get(self, tenant: str, name: str) -> AdapterStatus:
        return await _remote(self._holder(tenant, name).get.remote(tenant, name))
