"""The seam between adapter kinds and the layers: a delta per module, a compute form per delta type.

A kind's loader turns a PEFT directory into one `Delta` per target module. Each Delta type names the
`Form` that computes it; every MultiAdapterLayer holds one instance of each registered Form, which keeps
the deltas of its slots (`load(slot, delta)`, `clear(slot)`) and applies them to the tokens of a step
(`apply(y, x, batch)`). A Form runs at one `Stage` of the layer: before the base layer (scaling its
input), on the base output, or adding a function of the input. Deltas answer for themselves: their
bytes, their fit to a module, their limits and the tensors they compute with.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import ClassVar

import torch

from ..batch import AdapterBatch
from ..kernels import FALLBACK


class SlotList(list):
    """A form's per-slot values (None: empty), counting its changes so that a kernel may cache what it
    derives from them (the Triton kernels' device table of slot pointers) until the next load or clear."""

    def __init__(self, num_slots: int) -> None:
        super().__init__([None] * num_slots)
        self.revision = 0
        self.derived: dict[str, object] = {}
        """What kernels keep beside the slots, by name: caches that check `revision` themselves (the
        Triton table), or the stacked factors the slots are views of (low_rank_rows.RankStacks)."""

    def __setitem__(self, index, value) -> None:
        super().__setitem__(index, value)
        self.revision += 1


class Stage(enum.Enum):
    """Where in the layer a form runs; the layer runs INPUT, then the base layer, then OUTPUT, then ADD."""

    INPUT = "input"
    """Before the base layer: updates rows of a copy of the input that the base layer then reads."""
    OUTPUT = "output"
    """After the base layer: adds a function of the base output of its rows."""
    ADD = "add"
    """After OUTPUT: adds a function of the layer's (unscaled) input."""


class SharedTensors:
    """Device tensors several slots (and layers) share, refcounted by key: VeRA's frozen projections.

    Loaded once per key (a content digest plus the slice's shape) whatever the number of adapters and
    layers that use them; dropped when the last slot holding them is cleared.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tensors: dict[tuple, tuple[torch.Tensor, int]] = {}

    def acquire(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        with self._lock:
            tensor, refs = self._tensors.get(key, (None, 0))
            if tensor is None:
                tensor = make()
            self._tensors[key] = (tensor, refs + 1)
            return tensor

    def release(self, key: tuple) -> None:
        with self._lock:
            tensor, refs = self._tensors[key]
            if refs <= 1:
                del self._tensors[key]
            else:
                self._tensors[key] = (tensor, refs - 1)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(t.numel() * t.element_size() for t, _ in self._tensors.values())

    def __len__(self) -> int:
        return len(self._tensors)


@dataclass(frozen=True)
class LayerSpec:
    """What a form needs to know about the layer it serves."""

    in_features: int
    out_features: int
    num_slots: int
    bias: torch.Tensor | None
    """The base layer's bias [out] (None without one); DoRA's output scaling leaves it out."""
    kernels: str
    """One of kernels.KERNELS, chosen per device in kernels.py."""
    shared: SharedTensors
    """The manager's store of tensors shared across slots and layers."""


@dataclass(frozen=True)
class BaseModule:
    """A served base module as a delta sees it when it binds to the base (DoRA's norms, VeRA's slices)."""

    shape: tuple[int, int]
    """(out, in)"""
    weight: Callable[[], torch.Tensor]
    """The frozen weight as [out, in] on its own device (never modified; a packed layer unpacks a copy
    on each call, so read it once)."""


class Delta:
    """One module's update in one compute form. Subclasses are frozen dataclasses of tensors."""

    form: ClassVar[type[Form]]
    """The form that computes this delta."""
    needs_base: ClassVar[bool] = False
    """True when the delta is only servable after bind() (it reads the base module)."""

    def parts(self) -> tuple[Delta, ...]:
        """The deltas the layer's forms hold for this one (a joint delta has several)."""
        return (self,)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor the delta holds, by field name."""
        return {f.name: v for f in fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def shared(self) -> dict[tuple, torch.Tensor]:
        """Tensors held once for all slots that share them (by key); none for most forms."""
        return {}

    def to(self, device: torch.device | str, dtype: torch.dtype, non_blocking: bool = False) -> Delta:
        """The delta on a device, floating tensors in `dtype`, contiguous."""
        moved = {
            name: t.to(
                device=device, dtype=dtype if t.is_floating_point() else t.dtype, non_blocking=non_blocking
            ).contiguous()
            for name, t in self.tensors().items()
        }
        return type(self)(**{**self.__dict__, **moved})

    def pin_memory(self) -> Delta:
        """The delta with its tensors in page-locked host memory (asynchronous copies to a GPU)."""
        return type(self)(**{**self.__dict__, **{n: t.pin_memory() for n, t in self.tensors().items()}})

    def bind(self, module: BaseModule) -> Delta:
        """The servable delta once the base module is known (deltas with needs_base override this)."""
        return self

    @property
    def rank(self) -> int | None:
        """The rank the manifest reports (None for forms without one)."""
        return None

    def misfit(self, shape: tuple[int, int]) -> str | None:
        """Why the delta does not fit a module of shape (out, in), or None when it does."""
        raise NotImplementedError

    def needed_rank(self, shape: tuple[int, int]) -> int:
        """The smallest max_rank that serves it on a module of shape (out, in): its rank, or for deltas
        without one the entries it holds over (out + in), what a LoRA of that rank holds."""
        return 0

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        """Why the delta exceeds the server's limits on a module of shape (out, in), or None."""
        return None

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(name, tensor) of every value the form computes with, scalings folded in."""
        return list(self.tensors().items())

    def nbytes(self, dtype: torch.dtype | None = None) -> int:
        """Bytes in a slot: floating tensors in `dtype` (as held when None), shared tensors excluded."""
        return sum(_bytes(t, dtype) for t in self.tensors().values())


def triton_kernel(name: str) -> Callable[..., None]:
    """A form's Triton kernel (adapters/triton/ops.py), imported at its first call: Triton is optional."""

    def call(*args: object) -> None:
        from ..triton import ops

        getattr(ops, name)(*args)

    call.__name__ = call.__qualname__ = name
    return call


def _bytes(t: torch.Tensor, dtype: torch.dtype | None) -> int:
    if dtype is not None and t.is_floating_point():
        return t.numel() * dtype.itemsize
    return t.numel() * t.element_size()


def shared_nbytes(deltas: Sequence[Delta], dtype: torch.dtype | None = None) -> int:
    """Bytes of the shared tensors of these deltas, each key counted once."""
    seen: dict[tuple, torch.Tensor] = {}
    for delta in deltas:
        for part in delta.parts():
            seen.update(part.shared())
    return sum(_bytes(t, dtype) for t in seen.values())


def entries_limit(shape: tuple[int, int], max_rank: int) -> int:
    """Most entries a delta may hold in a slot: what a rank-max_rank LoRA holds, max_rank * (out + in)."""
    return max_rank * (shape[0] + shape[1])


def entries_rank(entries: int, shape: tuple[int, int]) -> int:
    """The smallest max_rank whose entries_limit holds `entries`."""
    return -(-entries // (shape[0] + shape[1]))


@dataclass(frozen=True)
class JointDelta(Delta):
    """Several deltas of one module, each computed by its own form in the same slot (DoRA)."""

    members: tuple[Delta, ...]

    def parts(self) -> tuple[Delta, ...]:
        return self.members

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.tensors().items()}

    def to(self, device: torch.device | str, dtype: torch.dtype, non_blocking: bool = False) -> JointDelta:
        return JointDelta(tuple(m.to(device, dtype, non_blocking) for m in self.members))

    def pin_memory(self) -> JointDelta:
        return JointDelta(tuple(m.pin_memory() for m in self.members))

    @property
    def rank(self) -> int | None:
        return next((m.rank for m in self.members if m.rank is not None), None)

    def misfit(self, shape: tuple[int, int]) -> str | None:
        return next((r for m in self.members if (r := m.misfit(shape)) is not None), None)

    def needed_rank(self, shape: tuple[int, int]) -> int:
        return max(m.needed_rank(shape) for m in self.members)

    def over_limit(self, shape: tuple[int, int], max_rank: int) -> str | None:
        return next((r for m in self.members if (r := m.over_limit(shape, max_rank)) is not None), None)

    def served_tensors(self) -> list[tuple[str, torch.Tensor]]:
        return [named for m in self.members for named in m.served_tensors()]


class Form:
    """The deltas of one compute form in one layer, one per slot, and how they apply to a step.

    Subclasses set `stage` and implement `apply`; `kernels` maps 'reference', 'grouped', 'triton' and
    optionally 'parallel' to the functions `apply` calls through `kernel` (each with a Semantics
    docstring; the fast ones are tested against the reference).
    """

    stage: ClassVar[Stage] = Stage.ADD
    name: ClassVar[str]
    """How manifests name it (e.g. 'low_rank')."""

    def __init__(self, spec: LayerSpec) -> None:
        self.spec = spec
        self.slots: SlotList = SlotList(spec.num_slots)
        self.loaded: set[int] = set()

    @property
    def kernel(self) -> Callable[..., None]:
        """The layer's kernel of this form: the spec's, or what it falls back to (kernels.FALLBACK)."""
        name = self.spec.kernels
        while name not in self.kernels:
            name = FALLBACK[name]
        return self.kernels[name]

    def load(self, slot: int, delta: Delta) -> None:
        """Hold a delta (already on the layer's device and dtype) in a slot."""
        self.slots[slot] = delta
        self.loaded.add(slot)

    def clear(self, slot: int) -> None:
        self.slots[slot] = None
        self.loaded.discard(slot)

    def active(self, batch: AdapterBatch) -> bool:
        """Whether any slot of the step holds a delta of this form."""
        return not self.loaded.isdisjoint(batch.slots)

    def active_slots(self, batch: AdapterBatch) -> set[int]:
        return self.loaded & batch.slots

    def apply(self, y: torch.Tensor, x: torch.Tensor, batch: AdapterBatch) -> None:
        """Update y in place for the tokens whose slots hold a delta of this form.

        INPUT: y [T, in] is the base layer's input (a copy), x [T, in] the layer input.
        OUTPUT: y [T, out] is the layer output, x [T, out] its base output (the same tensor unless the
        layer had to keep them apart): read every row needed before writing any.
        ADD: y [T, out] is the layer output, x [T, in] the layer input.
        """
        raise NotImplementedError
