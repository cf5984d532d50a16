"""AdapterManager: the engine's one object for adapters: versions, disk -> host -> device, holds.

It composes the registry (versions and holds, plain bookkeeping), the host cache (normalized adapters
in CPU memory, loaded on a thread pool) and the device slots (the layers' slots). Threads: resolve,
release_holds, ensure_host and the registration calls may run on any thread (one lock keeps a hold and
its host protection together); acquire, release, prefix_kv, apply_drops and load_to_device run on the
engine thread only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftserve.engine.protocol import AdapterStatus, Tier
from peftserve.engine.request import AdapterRef
from peftserve.engine.sequence import HeldVersion
from peftserve.errors import AdapterNotFound, InvalidRequest, quote
from peftserve.metrics import AdapterMetrics, AdapterSnapshot
from peftserve.store import AdapterStore, StoredVersion
from peftserve.store.files import inside
from peftserve.store.ids import (
    DEFAULT_TENANT,
    full_adapter_id,
    parse_version,
    split_version,
    version_key,
    version_name,
)
from peftserve.store.manifest import AdapterManifest, FileEntry, file_entry
from peftserve.store.peft_files import CONFIG_NAME, WEIGHTS_NAME

from .base_spec import base_spec, fit_to_base
from .batch import AdapterBatch, AdapterContext, Span
from .forms import SharedTensors, low_rank_rows
from .host_cache import HostCache
from .kernels import select_kernels
from .kinds import FORMS
from .layer import wrap_model
from .loading import load_adapter
from .normalized import NormalizedAdapter
from .registry import AdapterRegistry, Removal, VersionRecord
from .slots import DeviceSlots

log = logging.getLogger(__name__)


def canonical_id(text: str) -> str:
    """The full id of what a request names, as the engine sees it: bare names are the default tenant's.

    The API resolves ids per caller before they reach the engine, so there this is the identity; direct
    engine users (tests, benchmarks, `serve --adapter NAME=DIR`) may name adapters without a tenant.
    """
    return full_adapter_id(text, DEFAULT_TENANT, local_mode=True)


@dataclass(frozen=True)
class ResolvedAdapters:
    """A request's adapters bound to versions, one hold each, released with release_holds(keys)."""

    deltas: tuple[HeldVersion, ...] = ()
    """Delta adapter versions (every kind but prefix tuning) and their weights; each needs a slot."""
    prefix: str | None = None
    """The prefix adapter's version key; its K/V (prefix_kv) fill the first num_virtual_tokens positions."""
    num_virtual_tokens: int = 0

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(held.key for held in self.deltas) + ((self.prefix,) if self.prefix else ())

    @property
    def is_base(self) -> bool:
        return not self.deltas and self.prefix is None


class AdapterManager:
    """Serves PEFT adapters on one frozen base model."""

    def __init__(
        self,
        model: nn.Module,
        num_slots: int,
        device: torch.device | str,
        dtype: torch.dtype,
        *,
        host_cache_bytes: int = 1 << 30,
        max_rank: int = 256,
        load_threads: int = 2,
        metrics_top_n: int = 20,
        kernels: str | None = None,
    ) -> None:
        """kernels: the forms' kernels (kernels.KERNELS); None picks the device's (kernels.py)."""
        if num_slots <= 0:
            raise InvalidRequest(f"num_slots must be > 0, got {num_slots}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.context = AdapterContext()
        self.kernels = kernels or select_kernels(self.device)
        self.shared = SharedTensors()
        """Tensors held once for all slots and layers that use them (VeRA's projections)."""
        self.layers = wrap_model(model, self.context, FORMS, num_slots, self.kernels, self.shared)
        self.base = base_spec(model, self.layers)
        self.metrics = AdapterMetrics(self.snapshot, metrics_top_n)
        self.registry = AdapterRegistry()
        self._pool = ThreadPoolExecutor(load_threads, thread_name_prefix="peftserve-adapter-load")
        self.host: HostCache[NormalizedAdapter] = HostCache(host_cache_bytes, self._pool)
        self.slots = DeviceSlots(
            self.layers,
            num_slots,
            self.device,
            dtype,
            on_load=lambda s: self.metrics.observe_load("device", s),
            slot_forms=self.context.slot_forms,
        )
        self._lock = threading.Lock()
        self._removed: list[str] = []  # version keys removed since take_removed last ran

    @property
    def max_mixture(self) -> int:
        """Adapters one request may mix: the slots pins can never take."""
        return self.num_slots - self.slots.max_pins

    def warm_up_work(self) -> dict[str, Callable[[], str]]:
        """What the kernels compile (CPU: seconds, per process), as work for the runner's warm-up, which
        may run it beside the steps (the kernels run their fallback from now until it is done); empty when
        there is nothing to compile."""
        build = low_rank_rows.build_work(self.dtype) if self.kernels == "compiled" else None
        return {"adapter kernels": build} if build is not None else {}

    def close(self) -> None:
        """Stop the load threads (pending loads are cancelled)."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- registration ---------------------------------------------------------------------------

    def validate(self, path: str | Path, follow_symlinks: bool = False) -> NormalizedAdapter:
        """Normalize a PEFT folder and check it against the base; InvalidRequest / FailedPrecondition."""
        return self._fit(load_adapter(path, follow_symlinks=follow_symlinks))

    def _fit(self, adapter: NormalizedAdapter) -> NormalizedAdapter:
        """Checked against the base and bound to it (DoRA reads the base weights)."""
        return fit_to_base(adapter, self.base, self.max_rank, lambda path: self.layers[path].base_module())

    def manifest_for(
        self, adapter_id: str, number: int, adapter: NormalizedAdapter, files: tuple[FileEntry, ...]
    ) -> AdapterManifest:
        """The manifest of a validated adapter's files as version `number` of adapter_id."""
        return AdapterManifest(
            adapter_id=adapter_id,
            version=version_name(number),
            kind=adapter.kind,
            peft_type=adapter.peft_type,
            base_fingerprint=self.base.fingerprint,
            ranks=adapter.ranks,
            target_modules=tuple(sorted(adapter.deltas)),
            num_virtual_tokens=adapter.prefix.num_virtual_tokens if adapter.prefix is not None else 0,
            nbytes=sum(f.size for f in files),
            files=files,
            created_at=time.time(),
            device_bytes=adapter.device_nbytes(self.dtype),
            shared_bytes=adapter.shared_nbytes(self.dtype),
            forms=adapter.forms,
            needs_max_rank=adapter.needed_rank(self.base.modules),
        )

    def register(self, adapter_id: str, path: str | Path) -> AdapterManifest:
        """Serve a PEFT folder from outside the store (serve --adapter) as the newest version of adapter_id.

        Validated and loaded now, so a bad folder fails at start; 'name' means the default tenant's.
        """
        full = canonical_id(adapter_id)
        if "@" in full:
            raise InvalidRequest(f"adapter id {quote(adapter_id)}: a registration takes no @version")
        folder = Path(path)
        adapter = self.validate(folder, follow_symlinks=True)
        files = tuple(file_entry(folder / n, follow_symlinks=True) for n in (CONFIG_NAME, WEIGHTS_NAME))
        with self._lock:
            manifest = self.manifest_for(full, self.registry.next_version(full), adapter, files)
            self._add(manifest, folder, None, adapter)
        log.info("registered adapter %s@%s (%s) from %s", full, manifest.version, manifest.peft_type, folder)
        return manifest

    def add_stored(self, stored: StoredVersion, adapter: NormalizedAdapter | None = None) -> None:
        """Register a committed store version (adapter: already normalized, e.g. by an upload)."""
        with self._lock:
            self._add(stored.manifest, stored.path, stored.root, adapter)

    def scan(self, store: AdapterStore) -> int:
        """Register every version in the store from its manifest (loaded on first use); returns the count."""
        count = 0
        for stored in store.scan():
            if stored.manifest.base_fingerprint != self.base.fingerprint:
                log.warning(
                    "store: %s@%s was validated against another base model (%s, serving %s); not served",
                    stored.manifest.adapter_id,
                    stored.manifest.version,
                    stored.manifest.base_fingerprint,
                    self.base.fingerprint,
                )
                continue
            self.add_stored(stored)
            count += 1
        log.info("store %s: %d adapter versions of %d adapters", store.root, count, len(self.registry))
        return count

    def next_version(self, adapter_id: str) -> int:
        with self._lock:
            return self.registry.next_version(adapter_id)

    # -- requests (any thread) ------------------------------------------------------------------

    def resolve(self, refs: Sequence[AdapterRef]) -> ResolvedAdapters:
        """Bind a request's adapters to their current (or pinned) versions and hold them.

        Checks: known ids, a prefix alone and unweighted, no version twice, a mixture within max_mixture
        slots (the weights themselves: engine.request.check_adapter_refs). Holds are taken only when
        every check passes.
        """
        if not refs:
            return ResolvedAdapters()
        full_ids = [canonical_id(ref.adapter_id) for ref in refs]
        with self._lock:
            records = [self.registry.lookup(full) for full in full_ids]
            keys = [r.key for r in records]
            if len(set(keys)) != len(keys):
                raise InvalidRequest("an adapter is named twice in one request")
            prefixes = [r for r in records if r.manifest.kind == "prefix"]
            if prefixes:
                if len(refs) > 1:
                    raise InvalidRequest(
                        f"prefix adapter {prefixes[0].adapter_id!r} cannot be in a mixture (only the kinds "
                        "computed in the layers can: every kind but prefix tuning)"
                    )
                if refs[0].weight != 1.0:
                    raise InvalidRequest(
                        f"prefix adapter {prefixes[0].adapter_id!r} cannot be weighted (weight must be 1)"
                    )
                resolved = ResolvedAdapters(
                    prefix=keys[0], num_virtual_tokens=prefixes[0].manifest.num_virtual_tokens
                )
            elif len(refs) > self.max_mixture:
                raise InvalidRequest(
                    f"a mixture of {len(refs)} adapters exceeds the {self.max_mixture} adapter slots a "
                    "request may use"
                )
            else:
                resolved = ResolvedAdapters(
                    deltas=tuple(HeldVersion(k, ref.weight) for k, ref in zip(keys, refs, strict=True))
                )
            for key in keys:
                self._hold(key)
        return resolved

    def hold_current(self, adapter_id: str) -> str:
        """Hold adapter_id's current version for an admin operation (and cancel a pending unload of it)."""
        with self._lock:
            record = self.registry.lookup(adapter_id)
            record.free_when_idle = False
            self._hold(record.key)
            return record.key

    def release_holds(self, keys: Iterable[str]) -> None:
        """End holds from resolve/hold_current; versions that must leave memory leave it now."""
        with self._lock:
            for key in keys:
                idle, free = self.registry.release(key)
                if idle:
                    self.host.unprotect(key)
                if free:
                    self._free(key)

    def ensure_host(self, keys: Iterable[str]) -> list[Future]:
        """Futures of the held versions' host copies: done at once if resident, else loading off-thread."""
        return [self.host.load(key, lambda key=key: self._load_version(key)) for key in keys]

    def missing_from_host(self, keys: Iterable[str]) -> list[str]:
        return [key for key in keys if key not in self.host]

    def record_traffic(self, keys: Iterable[str], tokens: int) -> None:
        """Count one finished request and its generated tokens for each adapter it used."""
        for key in keys:
            self.metrics.traffic.record(split_version(key)[0], tokens)

    # -- device tier (engine thread) ------------------------------------------------------------

    def acquire(self, ref: str) -> int | None:
        """Hold a slot for a version key (or an id's current version); None for prefix adapters."""
        key = self._key(ref)
        return self.slots.acquire(key, self._host_copy(key))

    def release(self, ref: str) -> None:
        """Drop one slot hold from acquire."""
        self.slots.release(self._key(ref))

    def prefix_kv(self, ref: str) -> torch.Tensor | None:
        """[L, 2 (key, value), kv_heads, nvt, head_dim] in the model's dtype/device; None if not prefix."""
        key = self._key(ref)
        adapter = self._host_copy(key)
        return self.slots.prefix_kv(key, adapter) if adapter.prefix is not None else None

    def load_to_device(self, key: str, pin: bool) -> None:
        """Make a held version resident on the device (LoadAdapter), optionally pinned."""
        self.slots.load(key, self._host_copy(key), pin)

    def drop_from_device(self, key: str) -> None:
        """Unpin a version and evict it once idle (any thread; applied by apply_drops)."""
        self.slots.request_drop(key)

    def apply_drops(self) -> None:
        """Apply requested device drops (engine thread, between steps)."""
        self.slots.apply_drops()

    def slot_of(self, ref: str) -> int | None:
        return self.slots.slot_of(self._key(ref))

    def set_batch(self, batch: AdapterBatch | None) -> None:
        """Set the step's batch before the forward, and None after it."""
        self.context.batch = batch

    def build_batch(self, spans: Sequence[Span], num_tokens: int) -> AdapterBatch:
        """AdapterBatch.build on this manager's device."""
        return AdapterBatch.build(spans, num_tokens, self.device)

    # -- administration -------------------------------------------------------------------------

    def unload(self, adapter_id: str) -> None:
        """Every version leaves device and host memory, held ones when their last request ends."""
        with self._lock:
            versions = self.registry.versions(adapter_id)
            if not versions:
                raise AdapterNotFound(f"adapter {quote(adapter_id)} not found")
            for key in self.registry.unload(adapter_id):
                self._free(key)
            for record in versions:
                self.slots.request_drop(record.key)  # unpins now; a held slot leaves at its release

    def remove(self, adapter_id: str, keep: int = 0) -> Removal:
        """Make all but the newest `keep` versions unaddressable (0: delete); their memory goes when idle."""
        with self._lock:
            removal = self.registry.remove(adapter_id, keep)
            self._removed += [record.key for record in removal.removed]
            for key in removal.freed:
                self._free(key)
            for record in removal.held:
                self.slots.request_drop(record.key)
        if keep == 0:
            self.metrics.traffic.forget(adapter_id)
        return removal

    def take_removed(self) -> list[str]:
        """Version keys removed (deleted or pruned) since the last call: the engine forgets their KV."""
        with self._lock:
            removed, self._removed = self._removed, []
        return removed

    def status(self, adapter_id: str) -> AdapterStatus:
        """The current version's manifest, tier and pin, and the requests holding any version."""
        with self._lock:
            record = self.registry.lookup(adapter_id)
            holds = self.registry.holds(adapter_id)
        key = record.key
        return AdapterStatus(
            manifest=record.manifest,
            tier=self.tier(key),
            pinned=self.slots.is_pinned(key),
            active_requests=holds,
        )

    def names(self, tenant: str) -> list[str]:
        with self._lock:
            return self.registry.names(tenant)

    def adapter_ids(self, tenant: str | None = None) -> list[str]:
        """Full ids of the tenant's adapters (every tenant's when None), sorted."""
        with self._lock:
            return self.registry.adapter_ids(tenant)

    def pinned_versions(self, adapter_id: str) -> list[str]:
        with self._lock:
            return [r.key for r in self.registry.versions(adapter_id) if self.slots.is_pinned(r.key)]

    def info(self, ref: str) -> AdapterManifest:
        """The manifest of a version key, or of an id's current version."""
        with self._lock:
            return self.registry.record(self._key_locked(ref)).manifest

    def tier(self, key: str) -> Tier:
        if self.slots.is_resident(key):
            return "device"
        return "host" if key in self.host else "disk"

    def snapshot(self) -> AdapterSnapshot:
        host, device = self.host.stats, self.slots.stats
        return AdapterSnapshot(
            loads={"host": host.loads, "device": device.loads},
            load_failures={"host": host.load_failures},
            evictions={"host": host.evictions, "device": device.evictions},
            resident={"disk": len(self.registry), "host": len(self.host), "device": len(self.slots)},
            host_bytes=self.host.nbytes,
            cache_hits=host.hits,
            cache_misses=host.misses,
        )

    # -- internals ------------------------------------------------------------------------------

    def _add(
        self,
        manifest: AdapterManifest,
        source: Path,
        store_root: Path | None,
        adapter: NormalizedAdapter | None,
    ) -> None:
        for key in self.registry.add(manifest, source, store_root):
            self._free(key)
        if adapter is not None:
            self.host.put(
                version_key(manifest.adapter_id, parse_version(manifest.version)), self._pinned(adapter)
            )

    def _hold(self, key: str) -> None:
        self.registry.hold(key)
        self.host.protect(key)

    def _free(self, key: str) -> None:
        self.host.discard(key)
        self.slots.request_drop(key)

    def _key(self, ref: str) -> str:
        if "@" in ref:
            return ref
        with self._lock:
            return self._key_locked(ref)

    def _key_locked(self, ref: str) -> str:
        return ref if "@" in ref else self.registry.lookup(canonical_id(ref)).key

    def _load_version(self, key: str) -> NormalizedAdapter:
        """Disk -> host (a load thread): read, verify sha256 against the manifest, normalize, check."""
        with self._lock:
            record: VersionRecord = self.registry.record(key)
        start = time.perf_counter()
        expected = {f.name: f.sha256 for f in record.manifest.files}
        if record.store_root is not None:
            inside(record.store_root, record.source)  # no folder on the way was swapped for a symlink
        adapter = self._fit(load_adapter(record.source, expected, follow_symlinks=record.store_root is None))
        self.metrics.observe_load("host", time.perf_counter() - start)
        return self._pinned(adapter)

    def _pinned(self, adapter: NormalizedAdapter) -> NormalizedAdapter:
        """The host copy as the device tier copies it best: page-locked when copies are asynchronous."""
        return adapter.pin_memory() if self.slots.copier.pins_host_memory else adapter

    def _host_copy(self, key: str) -> NormalizedAdapter:
        """The held version's host copy; loads it here (blocking) only if nobody ensured it first."""
        adapter = self.host.get(key)
        if adapter is None:
            log.warning(
                "adapter %s was not in host memory at admission; loading it on the engine thread", key
            )
            futures = self.ensure_host([key])
            wait(futures)
            adapter = futures[0].result()
        return adapter
