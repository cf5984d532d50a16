"""What Ray routes a request by, and the adapter versions a request is pinned to (plain Python).

Ray Serve's model multiplexing sends a request to a replica that already holds its multiplexed
model id. Here that id is the request's heaviest adapter without its version, so a replaced adapter
keeps its replicas; the version itself is pinned in the request, so every replica serves the same one.
"""

from __future__ import annotations

import dataclasses

from peftserve.engine.request import AdapterRef, GenerationRequest
from peftserve.store import AdapterStore
from peftserve.store.ids import split_id, split_version, version_key

BASE_MODEL_ROUTE = ""
"""The multiplexed model id of base-model requests: none, so Ray routes them by load alone."""


def routing_id(adapters: tuple[AdapterRef, ...]) -> str:
    """The adapter id a request is routed by: its heaviest adapter (the first of equals), unversioned."""
    if not adapters:
        return BASE_MODEL_ROUTE
    heaviest = max(adapters, key=lambda ref: abs(ref.weight))  # max keeps the first of equal weights
    return split_version(heaviest.adapter_id)[0]


class VersionPins:
    """Binds each adapter a request names to the shared store's newest version ('t/n' -> 't/n@vN').

    Reads the store's folder listing per request (one directory read), so an upload committed by any
    replica is what every following request gets. Ids with an explicit '@vN' are kept as written; ids
    with no version in the store (registered with `--adapter`, or unknown) are left for the replica to
    resolve, as one server would.
    """

    def __init__(self, store: AdapterStore | None) -> None:
        self._store = store

    def pin(self, request: GenerationRequest) -> GenerationRequest:
        if self._store is None or not request.adapters:
            return request
        adapters = tuple(AdapterRef(self._pin(ref.adapter_id), ref.weight) for ref in request.adapters)
        return dataclasses.replace(request, adapters=adapters)

    def _pin(self, full_id: str) -> str:
        adapter_id, number = split_version(full_id)
        if number is not None:
            return full_id
        assert self._store is not None
        newest = self._store.next_version(*split_id(adapter_id)) - 1
        return version_key(adapter_id, newest) if newest > 0 else full_id
