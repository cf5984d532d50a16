"""The per-step adapter batch (token -> slots) and the one side channel that hands it to the layers."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

SlotWeights = tuple[tuple[int, float], ...]
"""((slot, weight), ...) of one sequence: one pair (weight 1.0) for an adapter, several for a mixture."""
Span = tuple[int, int, SlotWeights]
"""(token_start, token_len, slot_weights) of one sequence in the flattened tokens of the step."""
T = TypeVar("T")


@dataclass(frozen=True)
class SlotGroup:
    """All tokens of the step that use one slot: a contiguous run or a gathered index."""

    slot: int
    start: int
    """First token of the run when `index` is None."""
    stop: int
    """One past the last token of the run when `index` is None."""
    index: torch.Tensor | None
    """[n] int64 token rows (ascending) when the tokens are not one contiguous run."""
    scale: float
    """Mixture weight shared by every token of the group (1.0 for single adapters)."""
    weight: torch.Tensor | None
    """[n, 1] per-token mixture weights when they differ inside the group; then `scale` is 1.0."""
    num_tokens: int


@dataclass(frozen=True)
class Gathered:
    """The tokens of several slots as one batch of rows, a token once per slot of its own among them."""

    index: torch.Tensor
    """[N] int64 token rows, slot after slot"""
    member: torch.Tensor
    """[N] int64 position of each row's slot in the slots asked for"""
    weight: torch.Tensor
    """[N, 1] each row's mixture weight for that slot"""


class AdapterBatch:
    """Which slots (and mixture weights) apply to which tokens in this step; built once, read by every layer.

    Grouping by slot happens here, once per step, so each layer runs one matmul pair per distinct slot
    and never looks at individual tokens.
    """

    def __init__(
        self,
        spans: tuple[Span, ...],
        num_tokens: int,
        groups: tuple[SlotGroup, ...],
        device: torch.device | str = "cpu",
        forms: tuple[type, ...] | None = None,
    ) -> None:
        """forms: the forms every layer applies whatever the step's slots (a captured CUDA graph's step,
        whose kernels read the slots from device tables at replay); None: the forms holding its slots."""
        self.forms = forms
        self.spans = spans
        self.num_tokens = num_tokens
        self.groups = groups
        self.slots = frozenset(g.slot for g in groups)
        self.disjoint = all(len(pairs) == 1 for _, _, pairs in spans)
        """No token is in two groups (no mixture): per-slot products write disjoint rows."""
        self.device = torch.device(device)
        self._gathered: dict[tuple[int, ...], Gathered] = {}
        self._memo: dict[object, object] = {}

    def memo(self, key: object, make: Callable[[], T]) -> T:
        """What `make` derives from this step's batch, built once per step however many layers ask."""
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]  # type: ignore[return-value]

    def gather(self, slots: tuple[int, ...]) -> Gathered:
        """The rows of these slots' tokens, for forms that compute several slots in one product.

        Built once per step and set of slots (every layer of a form asks for the same ones), in three
        host-to-device copies.
        """
        found = self._gathered.get(slots)
        if found is not None:
            return found
        position = {slot: i for i, slot in enumerate(slots)}
        rows: list[list[int]] = [[] for _ in slots]
        weights: list[list[float]] = [[] for _ in slots]
        for start, length, pairs in self.spans:
            for slot, weight in pairs:
                if slot in position:
                    rows[position[slot]] += range(start, start + length)
                    weights[position[slot]] += [weight] * length
        member = [i for i, r in enumerate(rows) for _ in r]
        flat_weights = [w for ws in weights for w in ws]
        gathered = Gathered(
            index=torch.tensor([t for r in rows for t in r], dtype=torch.long).to(self.device),  # [N]
            member=torch.tensor(member, dtype=torch.long).to(self.device),  # [N]
            weight=torch.tensor(flat_weights, dtype=torch.float32).to(self.device)[:, None],  # [N, 1]
        )
        self._gathered[slots] = gathered
        return gathered

    @property
    def empty(self) -> bool:
        return not self.groups

    @classmethod
    def build(cls, spans: Sequence[Span], num_tokens: int, device: torch.device | str) -> AdapterBatch:
        """Validate the spans and group their tokens by slot (index tensors moved to `device` in one copy)."""
        clean: list[Span] = []
        for start, length, pairs in spans:
            if length == 0:
                continue
            if start < 0 or length < 0 or start + length > num_tokens:
                raise ValueError(f"span ({start}, {length}) is outside the {num_tokens} tokens of the step")
            seen: set[int] = set()
            for slot, weight in pairs:
                if slot < 0 or slot in seen:
                    raise ValueError(f"span ({start}, {length}): slot {slot} is negative or listed twice")
                if not math.isfinite(weight):
                    raise ValueError(f"span ({start}, {length}): weight {weight} is not finite")
                seen.add(slot)
            if pairs:
                clean.append((start, length, tuple((int(s), float(w)) for s, w in pairs)))
        clean.sort(key=lambda span: span[0])
        for (s0, n0, _), (s1, _, _) in zip(clean, clean[1:], strict=False):
            if s0 + n0 > s1:
                raise ValueError(f"spans starting at {s0} and {s1} overlap")

        runs: dict[int, list[tuple[int, int, float]]] = {}
        for start, length, pairs in clean:
            for slot, weight in pairs:
                runs.setdefault(slot, []).append((start, length, weight))

        # Gathered groups share one index tensor and one weight tensor, made from Python lists (one call
        # each, not one per run: a decode step's runs are single tokens) and copied to the device once.
        index_rows: list[int] = []
        row_weights: list[float] = []
        # One plan per slot: (slot, start, n, scale, gathered, weights vary within the group).
        plans: list[tuple[int, int, int, float, bool, bool]] = []
        for slot in sorted(runs):
            slot_runs = runs[slot]
            n = sum(length for _, length, _ in slot_runs)
            weights = {w for _, _, w in slot_runs}
            uniform = len(weights) == 1
            start = slot_runs[0][0]
            contiguous = slot_runs[-1][0] + slot_runs[-1][1] - start == n
            if contiguous and uniform:
                plans.append((slot, start, n, weights.pop(), False, False))
                continue
            index_rows += (t for s, length, _ in slot_runs for t in range(s, s + length))
            if not uniform:
                row_weights += (w for _, length, w in slot_runs for _ in range(length))
            plans.append((slot, start, n, weights.pop() if uniform else 1.0, True, not uniform))
        index = weight = None  # [sum n] each, where some group is gathered (has varying weights)
        if index_rows:
            index = torch.tensor(index_rows, dtype=torch.long).to(device, non_blocking=True)
        if row_weights:
            weight = torch.tensor(row_weights, dtype=torch.float32).to(device, non_blocking=True)

        groups: list[SlotGroup] = []
        index_at = weight_at = 0
        for slot, start, n, scale, gathered, varying in plans:
            if not gathered:
                groups.append(SlotGroup(slot, start, start + n, None, scale, None, n))
                continue
            assert index is not None
            w = None
            if varying:
                assert weight is not None
                w = weight[weight_at : weight_at + n].unsqueeze(1)  # [n, 1]
                weight_at += n
            groups.append(SlotGroup(slot, 0, 0, index[index_at : index_at + n], scale, w, n))
            index_at += n
        return cls(tuple(clean), num_tokens, tuple(groups), device)


class AdapterContext:
    """The one side channel between the manager and its layers: the batch of the step being run.

    Linear modules receive no keyword arguments from the model forward, so every MultiAdapterLayer holds
    a reference to this object and reads `batch` when called. None means base model for every token.
    """

    def __init__(self) -> None:
        self.batch: AdapterBatch | None = None
        self.slot_forms: dict[int, frozenset[type]] = {}
        """Slot -> the forms its adapter's deltas use (DeviceSlots keeps it): which steps a graph can run."""
