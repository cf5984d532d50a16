"""Executes a StepInput: writes prefix K/V, builds the step's tensors, runs the model, samples.

Batch isolation: every operation of a step is row-wise (embeddings, norms, the Linear layers and
their adapter deltas, the output head, sampling) except attention, which reads only its own
sequence's cache slots; positions it pads or masks read the cache's zeroed null slot. So a row's
values, NaN included, never reach another row (tests/engine/test_batch_isolation.py poisons every
slot outside a sequence's context with NaN and checks the outputs do not change by a bit). Mixture-
of-experts layers route each token on its own, with no capacity limit and no batch statistic; only the
grouping of their expert matmuls depends on the other rows' routes, which can move a row's last bits
(about 5e-7 in fp32, adapters/experts.py), never carry another row's values into it.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch

from peftserve import native
from peftserve.adapters.batch import AdapterBatch, AdapterContext
from peftserve.engine.sequence import Sequence
from peftserve.engine.step import PackedChunk, Sampled, StepInput, StepOutput
from peftserve.model.geometry import head_dim, kv_heads, text_config
from peftserve.runner import paged_kernel
from peftserve.runner.attention import ATTENTION_NAME, AttentionMetadata, PrefillChunk
from peftserve.runner.flex import MIN_TOKENS, PagedLayout, flex_paged_attention, unwritten_tails
from peftserve.runner.kv_cache import PagedKVCache
from peftserve.runner.linear import pack_linears, packing_targets
from peftserve.runner.packed_cache import PackedCache
from peftserve.runner.priority import lowest_priority
from peftserve.runner.sampler import SampleRow, finite_rows, sample
from peftserve.runner.vector_units import trust_known_vector_units

log = logging.getLogger(__name__)


def _pack(model: torch.nn.Module, stop: threading.Event) -> str:
    """pack_linears, as warm-up work."""
    return f"{pack_linears(model, stop)} Linear layers run on prepacked oneDNN weights"


def attention_calls(model: torch.nn.Module) -> set[tuple[float, float | None]]:
    """(scaling, soft-cap) of each distinct call the model's attention layers make (compiled apart: the
    kernel is specialized on both), read from the layers as transformers' models pass them: `scaling`
    (None: 1 / sqrt(head size)) and Gemma 2's `attn_logit_softcapping`; a model whose layers name
    neither: the default call."""
    default = head_dim(model.config) ** -0.5
    calls = {
        (getattr(m, "scaling", None) or default, getattr(m, "attn_logit_softcapping", None))
        for m in model.modules()
        if hasattr(m, "layer_idx")
        and hasattr(m, "scaling")
        and not isinstance(getattr(m, "sinks", None), torch.Tensor)
    }
    return calls or {(default, None)}


def _warm(name: str, run: Callable[[], str], began: float, threads: int, yielding: bool) -> str:
    """One piece of the warm-up on the engine's `threads` intra-op threads, logged with the seconds since
    `began` when it ends (it raises what fails).

    threads: a new thread starts with the count the process's last torch.set_num_threads gave (another
    engine's, a caller's), and attention's compiled graph is guarded on the count and built for it.
    yielding: in the background, at the lowest CPU priority (Linux, where that is the calling
    thread's own, and passes to the threads and processes it starts), so that steps served meanwhile
    take the cores first: without it, a 4-token request beside the warm-up took 4.2-4.9 s instead of
    1.2-1.4 s (benchmarks/README.md, "Serving while warming up"); a failure is logged there, as nothing
    else raises it.
    """
    torch.set_num_threads(threads)
    if yielding:
        lowest_priority()
    try:
        done = run()
    except BaseException:
        if yielding:
            log.exception("warm-up: %s failed", name)
        raise
    log.info("warm-up: %s in %.1f s", done, time.perf_counter() - began)
    return done


class ModelRunner:
    """Owns the model's tensors for serving: the paged KV cache and the per-request generators."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        adapters: AdapterContext | None = None,
        cpu_linear: str = "onednn",
        attention: str = "cpp",
        warm_up: str = "before",
        warm_ups: Callable[[], Mapping[str, Callable[[], str]]] | None = None,
        packed_cache: PackedCache | None = None,
    ) -> None:
        """adapters: the side channel of the model's adapter layers (None: a model without them);
        attention: cpp or flex (read the pools in place, on CPU: our kernel or torch's flex attention)
        or sdpa (gather each context, then SDPA);
        warm_up: background or before (EngineConfig.warm_up); warm_ups: gives more work for the warm-up
        when it starts, by name (the adapter kernels' build), each returning what it made; packed_cache:
        where the packed weights of an earlier start are taken from, and this start's are kept once
        packed (None: packed at every start)."""
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.adapters = adapters
        self.cache = PagedKVCache(
            num_layers=config.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=kv_heads(config),
            head_dim=head_dim(config),
            dtype=self.dtype,
            device=self.device,
        )
        model.set_attn_implementation(ATTENTION_NAME)
        self._generators: dict[str, torch.Generator] = {}
        self._offsets = torch.arange(block_size, device=self.device)
        self.graphs = None  # DecodeGraphs once enable_graphs is called
        self._sinks = any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules())
        """Layers with attention sinks (GPT-OSS) gather their context even when the rest read in place."""
        self.in_place: Callable[..., torch.Tensor] | None = None
        """What steps read the pools in place with (kernel_paged_attention or flex_paged_attention); None
        while they gather. Set once it is built or compiled (_warm_up)."""
        self._attention_kernel: Callable[..., torch.Tensor] | None = None
        """What in_place becomes once attention's warm-up is done."""
        self._warming: dict[str, Future] = {}
        """Warm-up work not yet taken in by a step, by name: see _warm_up."""
        self.background_warm_up = False
        """Whether the warm-up runs beside the steps (there is work, and warm_up is background)."""
        self._stop = threading.Event()
        """Set by close: packing (and keeping what it packed) stops after its current layer."""
        self.keeping: Future | None = None
        """Writing the packed weights to packed_cache, after packing (its result says where, or why not)."""
        self._packed_cache = packed_cache
        pack = cpu_linear == "onednn" and self.device.type == "cpu"
        if pack and packed_cache is not None:
            packed_cache.restore(model)
        self._warm_up(
            # both are CPU kernels; other devices keep the gathering path until it is measured there.
            attention=attention if attention != "sdpa" and self.device.type == "cpu" else None,
            pack=pack and bool(packing_targets(model)),
            background=warm_up == "background",
            more=warm_ups or dict,
        )

    def enable_graphs(
        self, max_batch: int, max_context: int, max_mixture: int, max_rank: int, capture=None
    ) -> None:
        """Replay pure decode steps from CUDA graphs captured per bucket (runner/graphs.py).

        capture: how a bucket is captured (graphs.capture_cuda_graph; tests pass capture_eagerly).
        """
        from peftserve.runner import graphs

        self.graphs = graphs.DecodeGraphs(
            self.model, self.cache, self._model, self.adapters, max_batch, max_context, max_mixture, max_rank,
            capture or graphs.capture_cuda_graph,
        )  # fmt: skip

    def release(self, seq: Sequence) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(seq.request_id, None)

    @torch.inference_mode()
    def execute(self, step: StepInput) -> StepOutput:
        """Run one step: _write_prefixes -> _attention -> _forward -> _sample."""
        if self._warming:
            self._take_warm_up()
        self._write_prefixes(step)
        meta = self._attention(step)
        logits = self.graphs.run(step, meta) if self.graphs is not None else None
        if logits is None:
            logits = self._forward(step, meta)  # [S, V]
        return self._sample(step, logits)

    def _write_prefixes(self, step: StepInput) -> None:
        """Prefix-tuning K/V into the first KV entries of the sequences admitted this step."""
        for write in step.prefixes:
            num_virtual = write.kv.shape[3]
            slots = self._slots(write.seq.blocks, write.start, num_virtual)
            self.cache.write_prefix(slots, write.kv[:, :, :, write.start :])

    def _attention(self, step: StepInput) -> AttentionMetadata:
        """Where each token's K/V goes and what each chunk attends to."""
        slot_parts: list[torch.Tensor] = []
        row_slots: list[int] = []  # decode slots not yet moved into slot_parts
        decodes: list[PackedChunk] = []
        prefills: list[PrefillChunk] = []
        bs = self.block_size
        for chunk in step.chunks:
            seq, start = chunk.seq, chunk.position
            if chunk.is_decode:
                decodes.append(chunk)
                row_slots.append(seq.blocks[start // bs] * bs + start % bs)
            else:
                ctx = start + chunk.num_tokens
                slots = self._slots(seq.blocks, 0, ctx)
                slot_parts += [self._tensor(row_slots), slots[start:]]
                row_slots = []
                prefills.append(
                    PrefillChunk(chunk.start, chunk.num_tokens, ctx, None if start == 0 else slots)
                )
        return AttentionMetadata(
            cache=self.cache,
            slot_mapping=torch.cat([*slot_parts, self._tensor(row_slots)]),
            prefills=prefills,
            paged=self._paged_layout([(c.position, c.num_tokens, c.seq.blocks) for c in step.chunks])
            if self.in_place is not None
            else None,
            attend=self.in_place,
            # the gathered decode rows: read by the gathering path, sink layers and captured graphs only
            **self._decode_metadata(decodes if self._gathers else []),
        )

    @property
    def _gathers(self) -> bool:
        """Whether a step needs each decode row's context gathered (built once per step, ~1 ms)."""
        return self.in_place is None or self._sinks or self.graphs is not None

    def _paged_layout(self, chunks: list[tuple[int, int, list[int]]]) -> PagedLayout:
        """The step's layout for attention in place; for flex, first zeroes the value rows past each
        sequence's end in its last block, which flex reads with weight 0 (see runner/flex.py)."""
        tails = unwritten_tails(chunks, self.block_size) if self.in_place is flex_paged_attention else []
        if tails:
            self.cache.values.index_fill_(1, self._tensor(tails), 0)
        return PagedLayout.build(chunks, self.block_size, self.cache.keys.shape[1], self.device)

    def _warm_up(
        self,
        attention: str | None,
        pack: bool,
        background: bool,
        more: Callable[[], Mapping[str, Callable[[], str]]],
    ) -> None:
        """Start what makes steps fast on CPU: attention in place (`attention`: our kernel, loaded at once
        where this machine has built it, else built; or flex, compiled by _compile_attention; until it
        is in use, steps gather) and packing the Linear weights (one layer at a time; each layer runs its
        plain weight until its packed one replaces it). Before serving: packing in a thread beside the
        rest (packing is torch's C++, which releases the GIL), then raise what failed. In the background:
        one after the other in one thread at the lowest priority, beside the steps (a step takes in what
        is done at its start: _take_warm_up); attention first, which slows the steps beside it less.
        `more` runs after attention, in its thread (it may use the compile's set-up: inductor's probes
        of the CPU). After packing, in its thread and at the lowest priority in either case, the packed
        weights are written to the packed cache (self.keeping): not warm-up, as steps already run at full
        speed. Where the packed cache is reading kept weights in (PackedCache.prefetch), that is warm-up
        work too, already running in its own threads."""
        work = {}
        if attention == "cpp":
            self._attention_kernel = paged_kernel.kernel_paged_attention
            if paged_kernel.load(self.dtype):
                self.in_place = self._attention_kernel  # built on an earlier start: nothing to wait for
            elif self.dtype in native.SCALARS:
                work["attention"] = functools.partial(paged_kernel.build, self.dtype)
        elif attention == "flex":
            self._attention_kernel = flex_paged_attention
            work["attention"] = self._compile_attention
        work.update(more())
        if pack:
            work["packing"] = functools.partial(_pack, self.model, self._stop)
        running = {}  # warm-up work that runs already: the kept weights being read in
        kept = self._packed_cache
        if kept is not None and kept.reading is not None and not kept.reading.done():
            running["reading the packed weights"] = kept.reading
        if not work and not running:
            return
        rest = ThreadPoolExecutor(1, thread_name_prefix="peftserve-warm-up")
        # before serving, packing in a second thread beside the rest; in the background, all in one
        packing = (
            ThreadPoolExecutor(1, thread_name_prefix="peftserve-pack") if pack and not background else rest
        )
        began, threads = time.perf_counter(), torch.get_num_threads()
        self._warming = running | {
            name: (packing if name == "packing" else rest).submit(
                _warm, name, run, began, threads, background
            )
            for name, run in work.items()
        }
        if pack and kept is not None:
            run = functools.partial(kept.keep, self.model, self._stop)
            self.keeping = packing.submit(_warm, "keeping the packed weights", run, began, threads, True)
        for pool in {rest, packing}:
            pool.shutdown(wait=False)  # its thread ends with its work
        if background:
            self.background_warm_up = True
            log.info("warming up in the background: %s", ", ".join(self._warming))
            return
        wait(self._warming.values())  # all of it, so that nothing still changes the model
        for future in self._warming.values():
            future.result()  # raises what failed
        self._take_warm_up()

    def close(self) -> None:
        """Cut the warm-up short, so that the process can exit: packing stops after its current layer
        (the rest keep their plain weights), and so do writing the packed weights (nothing is kept) and
        reading kept ones in; attention's compile and the adapter kernels' build run to their end
        (seconds: Python waits for them at exit)."""
        self._stop.set()
        if self._packed_cache is not None:
            self._packed_cache.close()

    def wait_warm_up(self, timeout: float | None = None) -> bool:
        """Wait until the warm-up's work is done; whether it is (steps take it in at their start)."""
        return not wait(list(self._warming.values()), timeout).not_done

    @property
    def warming(self) -> tuple[str, ...]:
        """Warm-up work still running: attention, adapter kernels, packing (empty once it has finished:
        the next step runs at full speed)."""
        return tuple(name for name, future in self._warming.items() if not future.done())

    def _take_warm_up(self) -> None:
        """At a step's start: switch to what the warm-up has done. Work that failed (in the background:
        before serving, it is raised at start) is left out, and the engine serves on without it."""
        done = {name: future for name, future in self._warming.items() if future.done()}
        # a new dict, never one changed in place: other threads may read it (wait_warm_up, warming)
        self._warming = {name: future for name, future in self._warming.items() if name not in done}
        for name, future in done.items():
            if future.exception() is not None:
                log.warning("serving on without %s (its warm-up failed)", name)
            elif name == "attention":
                self.in_place = self._attention_kernel

    @torch.inference_mode()
    def _compile_attention(self) -> str:
        """Compile attention in place for each call the model's layers make (attention_calls), on two
        tokens over the pool's first block, in inference mode as the steps call it (a graph compiled for
        other tensors would not pass their guards). It only reads the pool and drops its output, so steps
        may run beside it. The token count stays dynamic from 2 up; a lone token runs with a companion
        (flex.MIN_TOKENS)."""
        trust_known_vector_units()
        config = self.model.config
        heads = text_config(config).num_attention_heads
        query = torch.zeros(1, heads, MIN_TOKENS, head_dim(config), dtype=self.dtype, device=self.device)
        pool = self.cache.keys.shape[1]
        layout = PagedLayout.build([(0, MIN_TOKENS, [0])], self.block_size, pool, self.device)
        keys, values = self.cache.keys[0], self.cache.values[0]
        for scaling, softcap in attention_calls(self.model):
            flex_paged_attention(query, keys, values, layout, scaling, None, softcap)
        return "attention reads the KV pools in place (flex), compiled"

    def _forward(self, step: StepInput, meta: AttentionMetadata) -> torch.Tensor:
        """The model on the packed [1, T] batch; logits [S, V] at the sampling chunks' last tokens."""
        ids = torch.tensor(step.input_ids, device=self.device)[None]  # [1, T]
        pos = torch.tensor(step.positions, device=self.device)[None]  # [1, T]
        keep = self._tensor([c.start + c.num_tokens - 1 for c in step.sampling])  # [S]
        if self.adapters is not None and step.adapter_spans:
            self.adapters.batch = AdapterBatch.build(step.adapter_spans, step.num_tokens, self.device)
        try:
            return self._model(ids, pos, keep, meta)
        finally:
            if self.adapters is not None:
                self.adapters.batch = None

    def _model(
        self, ids: torch.Tensor, pos: torch.Tensor, keep: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """ids, pos: [1, T]; keep: [S] -> logits [S, V]."""
        return self.model(
            input_ids=ids,
            position_ids=pos,
            cache=self.cache,
            use_cache=True,
            logits_to_keep=keep,
            peftserve_attn=meta,
        ).logits[0]

    def _sample(self, step: StepInput, logits: torch.Tensor) -> StepOutput:
        computed = tuple((c.seq, c.num_tokens) for c in step.chunks)
        sampling = [c.seq for c in step.sampling]
        # A row is computed from its own sequence only, so non-finite logits are that request's own
        # failure: it gets no token (and an error), the rest of the batch samples as usual.
        finite = finite_rows(logits)  # [S]
        non_finite: list[Sequence] = []
        rows = logits
        if not bool(finite.all()):
            non_finite = [seq for seq, ok in zip(sampling, finite.tolist(), strict=True) if not ok]
            sampling = [seq for seq, ok in zip(sampling, finite.tolist(), strict=True) if ok]
            rows = logits.index_select(0, finite.nonzero()[:, 0])
        params = [
            SampleRow(
                params=seq.sampling,
                generator=self._generator(seq) if not seq.sampling.greedy else None,
                seen_ids=seq.token_ids if seq.sampling.repetition_penalty != 1.0 else [],
            )
            for seq in sampling
        ]
        tokens, logprobs = sample(rows, params) if params else ([], [])
        sampled = [Sampled(s, t, lp) for s, t, lp in zip(sampling, tokens, logprobs, strict=True)]
        return StepOutput(computed, sampled, non_finite, logits if len(step.sampling) else None)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """[end - start] pool slots of KV indices start..end-1 of a sequence."""
        table = torch.tensor(blocks, device=self.device)
        return (table[:, None] * self.block_size + self._offsets).flatten()[start:end]

    def _decode_metadata(self, decodes: list[PackedChunk]) -> dict:
        if not decodes:
            return {"decode_token_idx": None, "decode_slots": None, "decode_ctx_lens": None}
        seqs = [c.seq for c in decodes]
        ctx_lens = torch.tensor([c.position + 1 for c in decodes], device=self.device)  # [Bd]
        width = max(len(s.blocks) for s in seqs)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.device)
        lmax = int(ctx_lens.max())
        slots = (table[:, :, None] * self.block_size + self._offsets).flatten(1)[:, :lmax]  # [Bd, Lmax]
        # Positions past a row's context (its unwritten slots, the table's padding) read the null slot.
        past_end = torch.arange(lmax, device=self.device)[None, :] >= ctx_lens[:, None]  # [Bd, Lmax]
        return {
            "decode_token_idx": self._tensor([c.start for c in decodes]),
            "decode_slots": slots.masked_fill_(past_end, self.cache.null_slot),
            "decode_ctx_lens": ctx_lens,
        }

    def _generator(self, seq: Sequence) -> torch.Generator:
        gen = self._generators.get(seq.request_id)
        if gen is None:
            gen = torch.Generator()
            if seq.sampling.seed is None:
                gen.seed()
            else:
                gen.manual_seed(seq.sampling.seed)
            self._generators[seq.request_id] = gen
        return gen
