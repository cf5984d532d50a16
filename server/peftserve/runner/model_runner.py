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

import logging
from concurrent.futures import ThreadPoolExecutor

import torch

from peftserve.adapters.batch import AdapterBatch, AdapterContext
from peftserve.engine.sequence import Sequence
from peftserve.engine.step import PackedChunk, Sampled, StepInput, StepOutput
from peftserve.model.geometry import head_dim, kv_heads
from peftserve.runner.attention import ATTENTION_NAME, AttentionMetadata, PrefillChunk
from peftserve.runner.flex import MIN_TOKENS, PagedLayout, unwritten_tails
from peftserve.runner.kv_cache import PagedKVCache
from peftserve.runner.linear import pack_linears
from peftserve.runner.sampler import SampleRow, finite_rows, sample

log = logging.getLogger(__name__)


def _pack_on(threads: int, model: torch.nn.Module) -> int:
    """pack_linears on `threads` intra-op threads: a new thread starts with OpenMP's default team (every
    core), not the count torch.set_num_threads gave the thread that started it."""
    torch.set_num_threads(threads)
    return pack_linears(model)


class ModelRunner:
    """Owns the model's tensors for serving: the paged KV cache and the per-request generators."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        adapters: AdapterContext | None = None,
        cpu_linear: str = "onednn",
        attention: str = "flex",
    ) -> None:
        """adapters: the side channel of the model's adapter layers (None: a model without them);
        attention: flex (read the pools in place, on CPU) or sdpa (gather each context, then SDPA)."""
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
        # flex's block mask (one query block per token, G rows) is shaped for its CPU kernel; other
        # devices keep the gathering path until it is measured there.
        self.in_place = attention == "flex" and self.device.type == "cpu"
        self._sinks = any(isinstance(getattr(m, "sinks", None), torch.Tensor) for m in model.modules())
        """Layers with attention sinks (GPT-OSS) gather their context even when the rest read in place."""
        if cpu_linear == "onednn" and self.device.type == "cpu":
            # Packing (seconds, in C++) runs beside the warm-up's compile (seconds, mostly Python). The
            # warm-up's forward may meet a layer packed or not yet; its output is thrown away.
            with ThreadPoolExecutor(1, thread_name_prefix="peftserve-pack") as pool:
                packing = pool.submit(_pack_on, torch.get_num_threads(), model)
                self._warm_up()
            log.info("%d Linear layers run on prepacked oneDNN weights", packing.result())
        else:
            self._warm_up()
        log.info("attention: %s", "in place (flex)" if self.in_place else "gathered (sdpa)")

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
            if self.in_place
            else None,
            # the gathered decode rows: read by the gathering path, sink layers and captured graphs only
            **self._decode_metadata(decodes if self._gathers else []),
        )

    @property
    def _gathers(self) -> bool:
        """Whether a step needs each decode row's context gathered (built once per step, ~1 ms)."""
        return not self.in_place or self._sinks or self.graphs is not None

    def _paged_layout(self, chunks: list[tuple[int, int, list[int]]]) -> PagedLayout:
        """The step's layout for attention in place; first zeroes the value rows past each sequence's
        end in its last block, which the kernel reads with weight 0 (see runner/flex.py)."""
        tails = unwritten_tails(chunks, self.block_size)
        if tails:
            self.cache.values.index_fill_(1, self._tensor(tails), 0)
        return PagedLayout.build(chunks, self.block_size, self.cache.keys.shape[1], self.device)

    @torch.inference_mode()
    def _warm_up(self) -> None:
        """Compile attention in place before serving: a two-token prefill in the first slots, zeroed
        again afterwards (the kernel's token count is dynamic from 2 up; a lone token runs with a companion:
        flex.MIN_TOKENS). In inference mode, as `step` runs: its tensors are inference tensors, and a
        graph compiled for other tensors would not be reused (dynamo guards on it). Nothing to compile
        when attention gathers."""
        if not self.in_place:
            return
        num_tokens = MIN_TOKENS
        blocks = list(range(-(-num_tokens // self.block_size)))  # slot i is in block i // block_size
        meta = AttentionMetadata(
            cache=self.cache,
            slot_mapping=torch.arange(num_tokens, device=self.device),
            prefills=[PrefillChunk(0, num_tokens, num_tokens, None)],
            paged=self._paged_layout([(0, num_tokens, blocks)]),
            **self._decode_metadata([]),
        )
        ids = torch.zeros(1, num_tokens, dtype=torch.long, device=self.device)  # [1, T]
        pos = torch.arange(num_tokens, device=self.device)[None]  # [1, T]
        self._model(ids, pos, self._tensor([num_tokens - 1]), meta)
        self.cache.keys[:, :num_tokens] = 0
        self.cache.values[:, :num_tokens] = 0

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
