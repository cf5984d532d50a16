"""Decode steps replayed from CUDA graphs, one per bucket (EngineConfig.cuda_graphs, off by default).

A step qualifies when every chunk is a decode token that samples, with no prefix to write, and its
adapters use only forms a graph can run (ops.CAPTURABLE). It is padded to its bucket, keyed by (batch
size, context length, forms, mixture width), all rounded up: padding rows read token 0 at position 0,
attend to the zeroed null slot and write their K/V into the cache's scratch slot, so no real row sees
them. The step's tensors are copied into the graph's static buffers, the adapter slot tables brought up
to date, and the graph replayed. Graphs are captured on first use and share one memory pool.

Only `capture_cuda_graph` needs a GPU: tests run the same code with `capture_eagerly`, whose "replay"
runs the model again on the static buffers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from peftserve.adapters.batch import AdapterBatch, AdapterContext
from peftserve.adapters.forms import Form
from peftserve.adapters.layer import MultiAdapterLayer
from peftserve.adapters.triton import ops
from peftserve.adapters.triton.plan import Capacity, KernelPlan, build_plan
from peftserve.engine.step import StepInput
from peftserve.runner.attention import AttentionMetadata
from peftserve.runner.kv_cache import PagedKVCache

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]
"""(input_ids [1, B], position_ids [1, B], keep [B], meta) -> logits [B, V]: the runner's model call."""
Capture = Callable[[Callable[[], None], object], Callable[[], None]]
"""(run once, memory pool) -> replay."""


def capture_cuda_graph(run: Callable[[], None], pool: object) -> Callable[[], None]:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up off the capture: Triton compiles, the allocator settles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the adapter load threads may pin host memory meanwhile, which global mode forbids
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        run()
    return graph.replay


def capture_eagerly(run: Callable[[], None], pool: object) -> Callable[[], None]:
    run()
    return run


def buckets(largest: int, smallest: int) -> tuple[int, ...]:
    """Powers of two from `smallest`, then `largest` itself."""
    sizes = []
    size = smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return (*sizes, largest)


@dataclass
class _Graph:
    """One captured bucket: its static inputs, its adapter plan and where its logits land."""

    ids: torch.Tensor
    """[1, B]"""
    positions: torch.Tensor
    """[1, B]"""
    meta: AttentionMetadata
    plan: KernelPlan | None
    capacity: Capacity | None
    forms: tuple[Form, ...]
    """Every layer's forms of the graph's form types (their tables are refreshed before a replay)."""
    out: dict[str, torch.Tensor]
    replay: Callable[[], None] | None = None


class DecodeGraphs:
    """The runner's graphs of decode steps; `run` returns a qualifying step's logits, else None."""

    def __init__(
        self,
        model: torch.nn.Module,
        cache: PagedKVCache,
        forward: Forward,
        adapters: AdapterContext | None,
        max_batch: int,
        max_context: int,
        max_mixture: int,
        max_rank: int,
        capture: Capture = capture_cuda_graph,
    ) -> None:
        self.model = model
        self.cache = cache
        self.forward = forward
        self.adapters = adapters
        self.device = cache.keys.device
        self.batch_sizes = buckets(max_batch, 1)
        self.contexts = buckets(max_context, min(64, max_context))
        self.max_mixture = max_mixture
        self.max_rank = max_rank
        self.capture = capture
        self.layers = [m for m in model.modules() if isinstance(m, MultiAdapterLayer)]
        kernels = {form.spec.kernels for layer in self.layers for form in layer.forms.values()}
        self.adapter_steps = kernels == {"triton"}
        """Steps with adapters are captured only over the Triton kernels (the others branch on the step)."""
        self.pool = torch.cuda.graph_pool_handle() if capture is capture_cuda_graph else None
        self.graphs: dict[tuple, _Graph] = {}
        self.replays = 0

    def run(self, step: StepInput, meta: AttentionMetadata) -> torch.Tensor | None:
        """Logits [S, V] of a pure decode step, replayed from its bucket's graph; None: run it eagerly."""
        key = self._key(step, meta)
        if key is None:
            return None
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(*key)
        self._fill(graph, step, meta)
        for layer in self.layers:
            layer.wait_for_copies()  # a replay runs no forward that would wait for them
        if graph.forms:
            ops.refresh_tables(graph.forms, self.device)
        graph.meta._masks.clear()  # an eager replay recomputes them; a CUDA graph holds its own
        assert graph.replay is not None
        graph.replay()
        self.replays += 1
        return graph.out["logits"][: len(step.chunks)].clone()

    def _key(self, step: StepInput, meta: AttentionMetadata) -> tuple | None:
        if (
            step.prefixes
            or meta.prefills
            or meta.decode_slots is None
            or len(step.sampling) != len(step.chunks)
        ):
            return None
        size = next((b for b in self.batch_sizes if b >= len(step.chunks)), None)
        context = next((c for c in self.contexts if c >= meta.decode_slots.shape[1]), None)
        if size is None or context is None:
            return None
        forms: set[type] = set()
        pairs = 1
        slot_forms = self.adapters.slot_forms if self.adapters is not None else {}
        for _, _, slot_weights in step.adapter_spans:
            pairs = max(pairs, len(slot_weights))
            for slot, _ in slot_weights:
                if slot not in slot_forms:
                    return None
                forms |= slot_forms[slot]
        if forms and not (
            self.adapter_steps and forms.issubset(ops.CAPTURABLE) and pairs <= self.max_mixture
        ):
            return None
        names = tuple(sorted(forms, key=lambda cls: cls.name))
        return size, context, names, 1 if pairs == 1 else self.max_mixture

    def _capture(self, size: int, context: int, form_types: tuple[type, ...], pairs: int) -> _Graph:
        log.info("capturing a decode graph: %d rows, context %d, forms %s", size, context, form_types)
        device, cache = self.device, self.cache
        meta = AttentionMetadata(
            cache=cache,
            slot_mapping=torch.full((size,), cache.scratch_slot, dtype=torch.long, device=device),
            decode_token_idx=torch.arange(size, device=device),
            decode_slots=torch.full((size, context), cache.null_slot, dtype=torch.long, device=device),
            decode_ctx_lens=torch.ones(size, dtype=torch.long, device=device),
            prefills=[],
        )
        capacity = plan = batch = None
        if form_types:
            capacity = Capacity(tokens=size, pairs_per_token=pairs, rank=self.max_rank)
            plan = build_plan([], device, capacity)
            batch = AdapterBatch((), size, (), device, forms=form_types)
            batch.memo(ops.PLAN_KEY, lambda: plan)
        forms = tuple(layer.forms[cls] for layer in self.layers for cls in form_types if cls in layer.forms)
        graph = _Graph(
            ids=torch.zeros((1, size), dtype=torch.long, device=device),
            positions=torch.zeros((1, size), dtype=torch.long, device=device),
            meta=meta,
            plan=plan,
            capacity=capacity,
            forms=forms,
            out={},
        )
        keep = torch.arange(size, device=device)

        def run() -> None:
            if self.adapters is not None:
                self.adapters.batch = batch
            try:
                graph.out["logits"] = self.forward(graph.ids, graph.positions, keep, meta)
            finally:
                if self.adapters is not None:
                    self.adapters.batch = None

        graph.replay = self.capture(run, self.pool)
        return graph

    def _fill(self, graph: _Graph, step: StepInput, meta: AttentionMetadata) -> None:
        """Copy the step into the graph's static buffers; rows past it are padding."""
        n = len(step.chunks)
        static = graph.meta
        graph.ids[0, :n].copy_(torch.tensor(step.input_ids), non_blocking=True)
        graph.ids[0, n:] = 0
        graph.positions[0, :n].copy_(torch.tensor(step.positions), non_blocking=True)
        graph.positions[0, n:] = 0
        static.slot_mapping[:n] = meta.slot_mapping
        static.slot_mapping[n:] = self.cache.scratch_slot
        static.decode_slots.fill_(self.cache.null_slot)
        static.decode_slots[:n, : meta.decode_slots.shape[1]] = meta.decode_slots
        static.decode_ctx_lens[:n] = meta.decode_ctx_lens
        static.decode_ctx_lens[n:] = 1
        if graph.plan is not None:
            spans = AdapterBatch.build(step.adapter_spans, n, "cpu").spans  # validated, as the eager path
            graph.plan.data.copy_(build_plan(spans, self.device, graph.capacity).data)
