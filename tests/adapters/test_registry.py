"""Plain bookkeeping: registry versions and holds; the host cache (LRU, protection, one load per key)."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from peftserve.adapters.host_cache import HostCache
from peftserve.adapters.registry import AdapterRegistry
from peftserve.errors import AdapterNotFound, InvalidRequest
from peftserve.store.manifest import FileEntry
from tests.store.helpers import manifest_of

FILES = (FileEntry("adapter_model.safetensors", 1, hashlib.sha256(b"x").hexdigest()),)


def add(registry: AdapterRegistry, adapter_id: str, version: int) -> list[str]:
    return registry.add(manifest_of(adapter_id, version, FILES), Path("/nowhere"), Path("/"))


def test_versions_current_and_pins() -> None:
    registry = AdapterRegistry()
    assert add(registry, "acme/a", 1) == []
    assert add(registry, "acme/a", 2) == ["acme/a@v1"]  # superseded and idle: free now
    assert registry.lookup("acme/a").key == "acme/a@v2"
    assert registry.lookup("acme/a@v1").key == "acme/a@v1"
    assert registry.next_version("acme/a") == 3 and registry.next_version("acme/b") == 1
    with pytest.raises(AdapterNotFound, match="'acme/a@v9' not found"):
        registry.lookup("acme/a@v9")
    with pytest.raises(AdapterNotFound, match="'acme/b' not found"):
        registry.lookup("acme/b")
    with pytest.raises(InvalidRequest, match="already has version v2"):
        add(registry, "acme/a", 2)
    add(registry, "globex/z", 1)
    assert registry.names("acme") == ["a"] and registry.names("globex") == ["z"]
    assert registry.adapter_ids() == ["acme/a", "globex/z"] and registry.adapter_ids("acme") == ["acme/a"]


def test_held_versions_free_at_their_last_release() -> None:
    registry = AdapterRegistry()
    add(registry, "acme/a", 1)
    registry.hold("acme/a@v1")
    registry.hold("acme/a@v1")
    assert add(registry, "acme/a", 2) == []  # v1 is held: it stays
    assert registry.release("acme/a@v1") == (False, False)
    assert registry.release("acme/a@v1") == (True, True)  # idle and superseded: free it
    with pytest.raises(InvalidRequest, match="more often"):
        registry.release("acme/a@v1")
    registry.hold("acme/a@v2")
    assert registry.unload("acme/a") == ["acme/a@v1"]  # idle now; v2 when its request ends
    assert registry.release("acme/a@v2") == (True, True)
    assert registry.holds("acme/a") == 0


def test_remove_keeps_held_versions_until_released() -> None:
    registry = AdapterRegistry()
    for version in (1, 2, 3):
        add(registry, "acme/a", version)
    registry.hold("acme/a@v1")
    pruned = registry.remove("acme/a", keep=1)
    assert [r.key for r in pruned.removed] == ["acme/a@v1", "acme/a@v2"]
    assert pruned.freed == ["acme/a@v2"] and [r.key for r in pruned.held] == ["acme/a@v1"]
    with pytest.raises(AdapterNotFound):
        registry.lookup("acme/a@v1")
    assert registry.record("acme/a@v1").holds == 1  # a removed-but-held version still resolves by key
    deleted = registry.remove("acme/a")
    assert deleted.freed == ["acme/a@v3"] and len(registry) == 0
    assert registry.next_version("acme/a") == 4  # never reused while v1 is still held
    assert registry.release("acme/a@v1") == (True, True)
    with pytest.raises(AdapterNotFound):
        registry.record("acme/a@v1")


@dataclass
class Blob:
    nbytes: int


def test_host_cache_lru_and_protection() -> None:
    with ThreadPoolExecutor(2) as pool:
        cache: HostCache[Blob] = HostCache(100, pool)
        for key in "abc":
            cache.put(key, Blob(40))
        assert "a" not in cache and cache.nbytes == 80 and cache.stats.evictions == 1
        cache.get("b")  # b is now more recent than c, but c is protected
        cache.protect("c")
        cache.put("d", Blob(40))
        assert ("b" in cache, "c" in cache, "d" in cache) == (False, True, True)
        cache.protect("e")
        cache.put("e", Blob(90))  # protected entries alone may run over the budget
        assert ("c" in cache, "d" in cache, "e" in cache) == (True, False, True) and cache.nbytes == 130
        cache.unprotect("c")
        assert "c" not in cache and cache.nbytes == 90


def test_concurrent_loads_of_one_key_share_one_load() -> None:
    calls = 0
    gate = threading.Event()

    def load() -> Blob:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return Blob(1)

    with ThreadPoolExecutor(4) as pool:
        cache: HostCache[Blob] = HostCache(100, pool)
        futures = [cache.load("k", load) for _ in range(16)]
        futures[0].cancel()  # one caller gives up: the shared load goes on for the others
        time.sleep(0.05)
        gate.set()
        assert all(f.result(5) == Blob(1) for f in futures[1:])
        assert calls == 1 and cache.stats.loads == 1 and cache.stats.misses == 16
        assert cache.load("k", load).result() == Blob(1) and cache.stats.hits == 1

        gate.clear()
        pending = cache.load("gone", load)
        cache.discard("gone")  # deleted while loading: not inserted when the load ends
        gate.set()
        pending.result(5)
        assert "gone" not in cache
