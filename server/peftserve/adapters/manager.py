"""AdapterManager, the runner-facing API: registry, validation against the base, slots, side channel."""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftserve.engine.request import AdapterRef
from peftserve.errors import (
    AdapterNotFound,
    AdapterRejected,
    CapacityExceeded,
    FailedPrecondition,
    InvalidRequest,
)

from .batch import AdapterBatch, AdapterContext, Span
from .kernels import DeltaKernels, select_kernels
from .layer import WRAPPABLE, MultiAdapterLayer
from .loading import load_adapter
from .normalized import AdapterKind, LoraDelta, NormalizedAdapter, SparseDelta
from .peft_format import CONFIG_NAME

log = logging.getLogger(__name__)

ID_PART = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
MAX_ID_PARTS = 8


def validate_adapter_id(adapter_id: str) -> None:
    """Ids are '/'-separated parts of [a-z0-9][a-z0-9._-]{0,63}; InvalidRequest otherwise."""
    parts = adapter_id.split("/") if isinstance(adapter_id, str) else []
    if not parts or len(parts) > MAX_ID_PARTS or not all(ID_PART.fullmatch(p) for p in parts):
        raise InvalidRequest(
            f"adapter id {adapter_id!r} is not valid: up to {MAX_ID_PARTS} '/'-separated parts, each "
            "1-64 characters of a-z 0-9 . _ - starting with a letter or digit"
        )


@dataclass(frozen=True)
class AdapterInfo:
    """What the engine and the API may know about a registered adapter."""

    adapter_id: str
    kind: AdapterKind
    """'lora' (LORA, ADALORA), 'sparse' (SHIRA) or 'prefix' (PREFIX_TUNING)."""
    peft_type: str
    path: str
    num_modules: int
    """Modules the adapter updates (0 for prefix)."""
    ranks: tuple[int, ...]
    """Distinct per-module ranks, ascending (lora only)."""
    nnz: int
    """Sparse entries over all modules (sparse only)."""
    num_virtual_tokens: int
    """Prefix length: KV positions taken before the prompt (prefix only)."""
    nbytes: int
    """Bytes of the normalized tensors in float32."""


@dataclass(frozen=True)
class ResolvedAdapters:
    """A request's adapters after validation: delta adapters (with weights) or one prefix, or neither."""

    deltas: tuple[AdapterRef, ...] = ()
    """LoRA/AdaLoRA/sparse adapters and their mixture weights; each needs a slot (acquire)."""
    prefix: str | None = None
    """The prefix adapter; its K/V (prefix_kv) fill the first num_virtual_tokens KV positions."""
    num_virtual_tokens: int = 0

    @property
    def is_base(self) -> bool:
        return not self.deltas and self.prefix is None


@dataclass(frozen=True)
class BaseSpec:
    """The base model facts adapters are validated against."""

    modules: dict[str, tuple[int, int]]
    """Wrapped module path -> (out, in)."""
    num_layers: int
    kv_heads: int
    head_dim: int


def _base_spec(model: nn.Module, layers: dict[str, MultiAdapterLayer]) -> BaseSpec:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return BaseSpec(
        modules={path: (m.out_features, m.in_features) for path, m in layers.items()},
        num_layers=config.num_hidden_layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
    )


def wrap_model(
    model: nn.Module, context: AdapterContext, kernels: DeltaKernels, num_slots: int
) -> dict[str, MultiAdapterLayer]:
    """Wrap every Linear/Conv1D of the model except the output head, once, at start.

    Wrapping everything up front keeps the module tree fixed while serving (registering an adapter never
    mutates the model under a running forward); an unused wrapper costs one attribute check per call.
    The output head is left alone: the runner computes logits only at kept positions, so its rows are
    not the step's tokens.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, WRAPPABLE) and module is not head and not isinstance(module, MultiAdapterLayer)
    ]
    layers: dict[str, MultiAdapterLayer] = {}
    for path, module in targets:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        wrapper = MultiAdapterLayer(module, context, kernels, num_slots)
        setattr(parent, name, wrapper)
        layers[path] = wrapper
    return layers


def check_against_base(adapter: NormalizedAdapter, base: BaseSpec, model_paths: set[str]) -> None:
    """Targets exist and are served, shapes match: AdapterRejected otherwise, before any request sees it."""
    for path, delta in adapter.deltas.items():
        if path not in base.modules:
            if path in model_paths:
                raise AdapterRejected(
                    f"target module {path!r} is not served (only Linear/Conv1D modules below the output head)"
                )
            raise AdapterRejected(f"target module {path!r} does not exist in the base model")
        out_features, in_features = base.modules[path]
        if isinstance(delta, LoraDelta):
            if delta.shape != (out_features, in_features):
                raise AdapterRejected(
                    f"module {path!r}: lora_B/lora_A give shape (out, in) = {delta.shape}, the base module "
                    f"is {(out_features, in_features)}"
                )
        elif isinstance(delta, SparseDelta):
            rows_ok = bool(((delta.rows >= 0) & (delta.rows < out_features)).all())
            cols_ok = bool(((delta.cols >= 0) & (delta.cols < in_features)).all())
            if not (rows_ok and cols_ok):
                raise AdapterRejected(
                    f"module {path!r}: shira_indices fall outside the base module's "
                    f"{(out_features, in_features)}"
                )
    if adapter.prefix is not None:
        num_layers, _, kv_heads, _, head_dim = adapter.prefix.kv.shape
        expected = (base.num_layers, base.kv_heads, base.head_dim)
        if (num_layers, kv_heads, head_dim) != expected:
            raise AdapterRejected(
                f"prefix shape (num_layers, num_attention_heads, head_dim) = "
                f"{(num_layers, kv_heads, head_dim)} "
                f"does not match the base model's (layers, kv heads, head_dim) = {expected}"
            )


class AdapterManager:
    """Registers PEFT adapters against one frozen base model and keeps a bounded set resident in slots.

    Threads: register/scan_store may run beside the engine thread; every bookkeeping change holds a lock.
    acquire/release/set_batch are called by the engine/runner thread only.
    """

    def __init__(self, model: nn.Module, num_slots: int, device: torch.device | str, dtype: torch.dtype):
        if num_slots <= 0:
            raise InvalidRequest(f"num_slots must be > 0, got {num_slots}")
        self.device = torch.device(device)
        self.dtype = dtype
        self.num_slots = num_slots
        self.context = AdapterContext()
        self.kernels = select_kernels(self.device)
        self._model_paths = {path for path, _ in model.named_modules()}
        self.layers = wrap_model(model, self.context, self.kernels, num_slots)
        self.base = _base_spec(model, self.layers)
        self._lock = threading.Lock()
        self._adapters: dict[str, NormalizedAdapter] = {}
        self._infos: dict[str, AdapterInfo] = {}
        self._slot_of: dict[str, int] = {}
        self._owner: list[str | None] = [None] * num_slots
        self._refs: dict[str, int] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()  # resident, unreferenced; oldest first
        self._prefix_cache: dict[str, torch.Tensor] = {}

    # -- registry ---------------------------------------------------------------------------------

    def register(self, adapter_id: str, path: str | Path) -> AdapterInfo:
        """Load, normalize and validate an adapter against the base; it is servable once this returns."""
        validate_adapter_id(adapter_id)
        with self._lock:
            if adapter_id in self._adapters:
                raise InvalidRequest(f"adapter {adapter_id!r} is already registered")
        adapter = load_adapter(path)
        check_against_base(adapter, self.base, self._model_paths)
        info = _info(adapter_id, adapter, str(path))
        with self._lock:
            if adapter_id in self._adapters:
                raise InvalidRequest(f"adapter {adapter_id!r} is already registered")
            self._adapters[adapter_id] = adapter
            self._infos[adapter_id] = info
        log.info(
            "registered adapter %s (%s, %d modules) from %s",
            adapter_id,
            info.peft_type,
            info.num_modules,
            path,
        )
        return info

    def unregister(self, adapter_id: str) -> None:
        """Forget an adapter; FailedPrecondition while a request holds it."""
        with self._lock:
            self._get(adapter_id)
            if self._refs.get(adapter_id, 0) > 0:
                raise FailedPrecondition(f"adapter {adapter_id!r} is in use by running requests")
            if adapter_id in self._slot_of:
                self._evict(adapter_id)
            self._prefix_cache.pop(adapter_id, None)
            del self._adapters[adapter_id], self._infos[adapter_id]

    def scan_store(self, root: str | Path) -> list[AdapterInfo]:
        """Register every <root>/<a>/<b>/... directory holding adapter_config.json, id 'a/b/...'.

        Bad adapters (invalid id, rejected files) are logged and skipped; directories are not followed
        through symlinks, so nothing outside the store is read.
        """
        root_path = Path(root).resolve()
        found: list[AdapterInfo] = []
        for dirpath, dirnames, filenames in os.walk(root_path, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if CONFIG_NAME not in filenames:
                continue
            dirnames[:] = []  # an adapter directory holds no further adapters
            adapter_dir = Path(dirpath)
            adapter_id = adapter_dir.relative_to(root_path).as_posix()
            try:
                if adapter_id in self._infos:
                    continue
                found.append(self.register(adapter_id, adapter_dir))
            except InvalidRequest as exc:
                log.warning("skipping adapter directory %s: %s", adapter_dir, exc)
            except Exception:
                log.exception("skipping adapter directory %s: unexpected error", adapter_dir)
        return found

    def info(self, adapter_id: str) -> AdapterInfo:
        with self._lock:
            self._get(adapter_id)
            return self._infos[adapter_id]

    def registered(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._infos[i] for i in sorted(self._infos)]

    def resolve(self, refs: tuple[AdapterRef, ...]) -> ResolvedAdapters:
        """Check a request's adapters before admission: known ids, a prefix alone, finite weights."""
        if not refs:
            return ResolvedAdapters()
        seen: set[str] = set()
        for ref in refs:
            validate_adapter_id(ref.adapter_id)
            if ref.adapter_id in seen:
                raise InvalidRequest(f"adapter {ref.adapter_id!r} is named twice in one request")
            seen.add(ref.adapter_id)
            if not math.isfinite(ref.weight):
                raise InvalidRequest(f"adapter {ref.adapter_id!r}: weight {ref.weight} is not finite")
        with self._lock:
            infos = [self._infos[r.adapter_id] if r.adapter_id in self._infos else None for r in refs]
        for ref, info in zip(refs, infos, strict=True):
            if info is None:
                raise AdapterNotFound(f"adapter {ref.adapter_id!r} is not registered")
        prefixes = [info for info in infos if info is not None and info.kind == "prefix"]
        if prefixes:
            if len(refs) > 1:
                raise InvalidRequest(
                    f"prefix adapter {prefixes[0].adapter_id!r} cannot be in a mixture (LoRA/sparse only)"
                )
            if refs[0].weight != 1.0:
                raise InvalidRequest(
                    f"prefix adapter {refs[0].adapter_id!r} cannot be weighted (weight must be 1)"
                )
            return ResolvedAdapters(
                prefix=prefixes[0].adapter_id, num_virtual_tokens=prefixes[0].num_virtual_tokens
            )
        if len(refs) > self.num_slots:
            raise InvalidRequest(
                f"a mixture of {len(refs)} adapters exceeds the {self.num_slots} adapter slots"
            )
        return ResolvedAdapters(deltas=tuple(refs))

    # -- slots ------------------------------------------------------------------------------------

    def acquire(self, adapter_id: str) -> int | None:
        """Make a delta adapter resident and hold it; its slot, or None for a prefix adapter (no slot).

        Loads into a free slot or evicts the least recently released unheld adapter; CapacityExceeded
        when every slot is held.
        """
        with self._lock:
            adapter = self._get(adapter_id)
            if adapter.kind == "prefix":
                return None
            slot = self._slot_of.get(adapter_id)
            if slot is None:
                slot = self._free_slot()
                self._load(adapter_id, adapter, slot)
            self._refs[adapter_id] = self._refs.get(adapter_id, 0) + 1
            self._idle.pop(adapter_id, None)
            return slot

    def release(self, adapter_id: str) -> None:
        """Drop one hold from acquire; the adapter stays resident until its slot is needed."""
        with self._lock:
            adapter = self._get(adapter_id)
            if adapter.kind == "prefix":
                return
            refs = self._refs.get(adapter_id, 0)
            if refs <= 0:
                raise FailedPrecondition(f"adapter {adapter_id!r} is released more often than acquired")
            self._refs[adapter_id] = refs - 1
            if refs == 1:
                self._idle[adapter_id] = None

    def slot_of(self, adapter_id: str) -> int | None:
        """The slot an adapter is resident in, or None."""
        with self._lock:
            return self._slot_of.get(adapter_id)

    def prefix_kv(self, adapter_id: str) -> torch.Tensor | None:
        """[L, 2 (key, value), kv_heads, nvt, head_dim] in the model's dtype/device; None if not prefix."""
        with self._lock:
            adapter = self._get(adapter_id)
            if adapter.prefix is None:
                return None
            kv = self._prefix_cache.get(adapter_id)
            if kv is None:
                kv = adapter.prefix.kv.to(device=self.device, dtype=self.dtype)
                self._prefix_cache[adapter_id] = kv
            return kv

    # -- per step ---------------------------------------------------------------------------------

    def set_batch(self, batch: AdapterBatch | None) -> None:
        """Set the step's batch before the forward, and None after it."""
        self.context.batch = batch

    def build_batch(self, spans: Sequence[Span], num_tokens: int) -> AdapterBatch:
        """AdapterBatch.build on this manager's device."""
        return AdapterBatch.build(spans, num_tokens, self.device)

    # -- internals (lock held) --------------------------------------------------------------------

    def _get(self, adapter_id: str) -> NormalizedAdapter:
        adapter = self._adapters.get(adapter_id)
        if adapter is None:
            raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
        return adapter

    def _free_slot(self) -> int:
        for slot, owner in enumerate(self._owner):
            if owner is None:
                return slot
        if not self._idle:
            raise CapacityExceeded(f"all {self.num_slots} adapter slots are held by running requests")
        victim = next(iter(self._idle))
        slot = self._slot_of[victim]
        self._evict(victim)
        return slot

    def _evict(self, adapter_id: str) -> None:
        slot = self._slot_of.pop(adapter_id)
        for path in self._adapters[adapter_id].deltas:
            self.layers[path].clear(slot)
        self._owner[slot] = None
        self._idle.pop(adapter_id, None)
        self._refs.pop(adapter_id, None)

    def _load(self, adapter_id: str, adapter: NormalizedAdapter, slot: int) -> None:
        for path, delta in adapter.deltas.items():
            self.layers[path].load(slot, delta.to(self.device, self.dtype))
        self._owner[slot] = adapter_id
        self._slot_of[adapter_id] = slot


def _info(adapter_id: str, adapter: NormalizedAdapter, path: str) -> AdapterInfo:
    ranks = sorted({d.rank for d in adapter.deltas.values() if isinstance(d, LoraDelta)})
    nnz = sum(d.nnz for d in adapter.deltas.values() if isinstance(d, SparseDelta))
    nvt = adapter.prefix.num_virtual_tokens if adapter.prefix is not None else 0
    return AdapterInfo(
        adapter_id=adapter_id,
        kind=adapter.kind,
        peft_type=adapter.peft_type,
        path=path,
        num_modules=len(adapter.deltas),
        ranks=tuple(ranks),
        nnz=nnz,
        num_virtual_tokens=nvt,
        nbytes=adapter.nbytes,
    )
