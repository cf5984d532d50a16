"""The routing id of a request and the versions it is pinned to (no Ray cluster needed)."""

from __future__ import annotations

from pathlib import Path

from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from peftserve.deploy.routing import BASE_MODEL_ROUTE, VersionPins, routing_id
from peftserve.deploy.status import as_peftserve_error
from peftserve.engine.request import AdapterRef, GenerationRequest
from peftserve.errors import CapacityExceeded, InvalidRequest, Unavailable
from peftserve.store import AdapterStore


def test_routing_id_is_the_heaviest_adapter_without_its_version() -> None:
    assert routing_id(()) == BASE_MODEL_ROUTE
    assert routing_id((AdapterRef("acme/a@v3"),)) == "acme/a"
    mixture = (AdapterRef("acme/a", 0.3), AdapterRef("acme/b@v2", -0.6), AdapterRef("acme/c", 0.1))
    assert routing_id(mixture) == "acme/b"
    assert routing_id((AdapterRef("acme/a", 0.5), AdapterRef("acme/b", 0.5))) == "acme/a"


def _commit(store: AdapterStore, adapter_id: str, version: str) -> None:
    folder = store.root / adapter_id / version
    folder.mkdir(parents=True)


def test_pins_follow_the_newest_version_folder_of_the_shared_store(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path)
    pins = VersionPins(store)
    request = GenerationRequest(
        "r", "hi", adapters=(AdapterRef("acme/a", 0.7), AdapterRef("acme/b@v1", 0.3), AdapterRef("x/y"))
    )
    _commit(store, "acme/a", "v1")
    assert [r.adapter_id for r in pins.pin(request).adapters] == ["acme/a@v1", "acme/b@v1", "x/y"]
    _commit(store, "acme/a", "v2")  # another replica committed a replacement
    pinned = pins.pin(request)
    assert [(r.adapter_id, r.weight) for r in pinned.adapters] == [
        ("acme/a@v2", 0.7),
        ("acme/b@v1", 0.3),
        ("x/y", 1.0),
    ]
    assert VersionPins(None).pin(request) is request


def test_ray_failures_become_the_retryable_peftserve_errors() -> None:
    assert isinstance(as_peftserve_error(ActorDiedError()), Unavailable)
    busy = as_peftserve_error(BackPressureError(num_queued_requests=3, max_queued_requests=3))
    assert isinstance(busy, CapacityExceeded) and busy.retry_after_s
    mistake = InvalidRequest("top_p must be in (0, 1]")
    assert as_peftserve_error(mistake) is mistake
