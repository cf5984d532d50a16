"""Executes a StepPlan: packs the step's tokens into one [1, T] batch, runs the model, samples.

Batch isolation: every operation of a step is row-wise (embeddings, norms, the Linear layers and
their adapter deltas, the output head, sampling) except attention, which reads only its own
sequence's cache slots; positions it pads or masks read the cache's zeroed null slot. So a row's
values, NaN included, never reach another row (tests/engine/test_batch_isolation.py poisons every
slot outside a sequence's context with NaN and checks the outputs do not change by a bit).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from peftserve.engine.adapter_binding import AdapterBinding
from peftserve.engine.scheduler import StepPlan
from peftserve.engine.sequence import Sequence
from peftserve.runner.attention import ATTENTION_NAME, AttentionMetadata, PrefillChunk
from peftserve.runner.kv_cache import PagedKVCache
from peftserve.runner.linear import pack_linears
from peftserve.runner.sampler import SampleRow, sample

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampled:
    """The token drawn for one sequence this step."""

    seq: Sequence
    token_id: int
    logprob: float


@dataclass(frozen=True)
class StepOutput:
    """What one step produced: a token per sampling sequence, or the sequences with non-finite logits."""

    sampled: list[Sampled]
    non_finite: list[Sequence]
    """Sequences whose logits held NaN or Inf this step: nothing was sampled for them."""


class ModelRunner:
    """Owns the model's tensors for serving: the paged KV cache and the per-request generators."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        adapters: AdapterBinding | None = None,
        cpu_linear: str = "onednn",
    ) -> None:
        config = model.config
        self.model = model
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.block_size = block_size
        self.adapters = adapters
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        self.cache = PagedKVCache(
            num_layers=config.num_hidden_layers,
            num_blocks=num_blocks,
            block_size=block_size,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        model.set_attn_implementation(ATTENTION_NAME)
        if cpu_linear == "onednn" and self.device.type == "cpu":
            log.info("%d Linear layers run on prepacked oneDNN weights", pack_linears(model))
        self._generators: dict[str, torch.Generator] = {}
        self._offsets = torch.arange(block_size, device=self.device)

    def release(self, seq: Sequence) -> None:
        """Forget a finished request's generator."""
        self._generators.pop(seq.request_id, None)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _slots(self, blocks: list[int], start: int, end: int) -> torch.Tensor:
        """[end - start] pool slots of KV indices start..end-1 of a sequence."""
        table = torch.tensor(blocks, device=self.device)
        return (table[:, None] * self.block_size + self._offsets).flatten()[start:end]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepOutput:
        for seq in plan.admitted:
            start = seq.num_cached  # virtual entries in blocks found in the prefix cache are there already
            if seq.num_virtual > start:
                prefix_kv = self.adapters.prefix_kv(seq.prefix_adapter)  # [L, 2, Hkv, nvt, D]
                slots = self._slots(seq.blocks, start, seq.num_virtual)
                self.cache.write_prefix(slots, prefix_kv[:, :, :, start:])

        input_ids: list[int] = []
        positions: list[int] = []
        decode_rows: list[int] = []
        decode_seqs: list[Sequence] = []
        prefills: list[PrefillChunk] = []
        slot_parts: list[torch.Tensor] = []
        row_slots: list[int] = []  # decode slots not yet moved into slot_parts
        bs = self.block_size
        sample_idx: list[int] = []
        for chunk in plan.chunks:
            seq, n = chunk.seq, chunk.num_tokens
            start = seq.num_computed
            q_start = len(input_ids)
            input_ids += seq.pending_token_ids(n)
            positions += range(start, start + n)
            if n == 1 and start > 0:
                decode_rows.append(q_start)
                decode_seqs.append(seq)
                row_slots.append(seq.blocks[start // bs] * bs + start % bs)
            else:
                ctx = start + n
                slots = self._slots(seq.blocks, 0, ctx)
                slot_parts += [self._tensor(row_slots), slots[start:]]
                row_slots = []
                prefills.append(PrefillChunk(q_start, n, ctx, None if start == 0 else slots))
            if chunk.sample:
                sample_idx.append(len(input_ids) - 1)

        meta = AttentionMetadata(
            cache=self.cache,
            slot_mapping=torch.cat([*slot_parts, self._tensor(row_slots)]),
            prefills=prefills,
            **self._decode_metadata(decode_seqs, decode_rows),
        )
        ids = torch.tensor(input_ids, device=self.device)[None]  # [1, T]
        pos = torch.tensor(positions, device=self.device)[None]  # [1, T]
        keep = torch.tensor(sample_idx, device=self.device)  # [S]
        if self.adapters is not None:
            self.adapters.set_batch(self.adapters.build_batch(plan, len(input_ids)))
        try:
            logits = self.model(
                input_ids=ids,
                position_ids=pos,
                cache=self.cache,
                use_cache=True,
                logits_to_keep=keep,
                peftserve_attn=meta,
            ).logits[0]  # [S, V]
        finally:
            if self.adapters is not None:
                self.adapters.set_batch(None)

        sampling = [c.seq for c in plan.chunks if c.sample]
        # A row is computed from its own sequence only, so non-finite logits are that request's own
        # failure: it gets no token (and an error), the rest of the batch samples as usual.
        finite = torch.isfinite(logits).all(dim=-1)  # [S]
        non_finite: list[Sequence] = []
        if not bool(finite.all()):
            keep_rows = finite.nonzero()[:, 0]
            non_finite = [seq for seq, ok in zip(sampling, finite.tolist(), strict=True) if not ok]
            sampling = [seq for seq, ok in zip(sampling, finite.tolist(), strict=True) if ok]
            logits = logits.index_select(0, keep_rows)
        rows = [
            SampleRow(
                params=seq.sampling,
                generator=self._generator(seq) if not seq.sampling.greedy else None,
                seen_ids=seq.token_ids if seq.sampling.repetition_penalty != 1.0 else [],
            )
            for seq in sampling
        ]
        tokens, logprobs = sample(logits, rows) if rows else ([], [])
        sampled = [Sampled(s, t, lp) for s, t, lp in zip(sampling, tokens, logprobs, strict=True)]
        return StepOutput(sampled, non_finite)

    def _decode_metadata(self, seqs: list[Sequence], decode_rows: list[int]) -> dict:
        if not decode_rows:
            return {"decode_token_idx": None, "decode_slots": None, "decode_ctx_lens": None}
        ctx_lens = torch.tensor([s.num_computed + 1 for s in seqs], device=self.device)  # [Bd]
        width = max(len(s.blocks) for s in seqs)
        table = torch.tensor([s.blocks + [0] * (width - len(s.blocks)) for s in seqs], device=self.device)
        lmax = int(ctx_lens.max())
        slots = (table[:, :, None] * self.block_size + self._offsets).flatten(1)[:, :lmax]  # [Bd, Lmax]
        # Positions past a row's context (its unwritten slots, the table's padding) read the null slot.
        past_end = torch.arange(lmax, device=self.device)[None, :] >= ctx_lens[:, None]  # [Bd, Lmax]
        return {
            "decode_token_idx": torch.tensor(decode_rows, device=self.device),
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
