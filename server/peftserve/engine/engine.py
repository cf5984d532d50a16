"""The synchronous engine: admits requests, runs steps, turns sampled tokens into outputs.

One thread drives it (see async_engine.py for the asyncio front). A step is data handed along:
``Scheduler.schedule() -> StepPlan``, ``pack(plan) -> StepInput``, ``ModelRunner.execute(input) ->
StepOutput``, ``Scheduler.update(output)``, then the engine's own bookkeeping: append tokens,
detokenize, detect stops, free finished sequences.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, replace

import torch

from peftserve.config import EngineConfig
from peftserve.engine.adapter_binding import AdapterBinding
from peftserve.engine.detokenizer import IncrementalDetokenizer
from peftserve.engine.fairness import TokenBuckets
from peftserve.engine.protocol import EngineStats, ModelInfo, PrefixCacheStats
from peftserve.engine.request import (
    FinishReason,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    check_adapter_refs,
)
from peftserve.engine.scheduler import Scheduler
from peftserve.engine.sequence import Sequence
from peftserve.engine.step import PrefixWrite, StepInput, StepOutput, pack
from peftserve.errors import AdapterNotFound, CapacityExceeded, InvalidRequest, NonFiniteOutput, quote
from peftserve.model.geometry import head_dim, kv_heads
from peftserve.model.loader import BaseModelSource, LoadedModel, eos_token_ids, max_context, read_base_model
from peftserve.model.text import encode
from peftserve.runner.kv_cache import kv_bytes_per_token
from peftserve.runner.model_runner import ModelRunner
from peftserve.runner.packed_cache import PackedCache

log = logging.getLogger(__name__)


@dataclass
class Completion:
    """A finished request, gathered from its outputs (for tests, benchmarks and batch use)."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    prompt_tokens: int
    cached_tokens: int = 0
    """Prompt tokens found in the prefix cache."""


class LLMEngine:
    """One frozen base model served with continuous batching over a paged KV cache."""

    def __init__(
        self,
        model,
        tokenizer,
        config: EngineConfig,
        model_id: str = "custom",
        adapters=None,
        store=None,
        packed_cache: PackedCache | None = None,
    ):
        """adapters: an AdapterManager already wrapped around model, or None to serve the base only.

        store: the AdapterStore the manager's versions come from (for the admin API), or None.
        packed_cache: the model's packed weights kept across starts (runner/packed_cache.py), or None.
        """
        model.eval().requires_grad_(False)
        hf = model.config
        self.config = config
        self.tokenizer = tokenizer
        self.adapters = AdapterBinding(adapters) if adapters is not None else None
        self.store = store
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        per_token = kv_bytes_per_token(hf.num_hidden_layers, kv_heads(hf), head_dim(hf), dtype)
        num_blocks = int(config.kv_cache_mb * 2**20) // (per_token * config.block_size)
        if num_blocks < 2:
            raise InvalidRequest(
                f"kv_cache_mb={config.kv_cache_mb} holds fewer than 2 blocks of {config.block_size} tokens"
                f" ({per_token} bytes per token); raise it"
            )
        model_max = max_context(model)
        self.max_context = min(config.max_context or model_max, model_max, num_blocks * config.block_size)
        self.scheduler = Scheduler(
            num_blocks=num_blocks,
            block_size=config.block_size,
            max_batched_tokens=max(config.max_batched_tokens, config.max_running),
            max_running=config.max_running,
            max_slot_adapters=self.adapters.num_slots if self.adapters else 0,
            policy=config.scheduling,
            prefix_cache=config.prefix_cache == "on",
            prefix_cache_tenant_share=config.prefix_cache_tenant_share,
        )
        self._tokens = TokenBuckets()
        self.runner = ModelRunner(
            model,
            num_blocks,
            config.block_size,
            adapters=adapters.context if adapters is not None else None,
            cpu_linear=config.cpu_linear,
            attention=config.attention,
            warm_up=config.warm_up,
            warm_ups=adapters.warm_up_work if adapters is not None else None,
            packed_cache=packed_cache,
        )
        if config.cuda_graphs:
            self.runner.enable_graphs(
                max_batch=config.max_running,
                max_context=self.max_context,
                max_mixture=adapters.max_mixture if adapters is not None else 1,
                max_rank=config.adapter_max_rank,
            )
        eos = list(eos_token_ids(model))
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(int(tokenizer.eos_token_id))
        self.eos_ids = frozenset(eos)
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._info = ModelInfo(
            model_id=model_id,
            family=hf.model_type,
            vocab_size=hf.vocab_size,
            max_context=self.max_context,
            max_new_tokens_limit=min(config.max_new_tokens_limit, self.max_context - 1),
            dtype=str(dtype).removeprefix("torch."),
            device=str(device),
            num_layers=hf.num_hidden_layers,
            hidden_size=hf.hidden_size,
            kv_blocks_total=num_blocks,
            kv_block_size=config.block_size,
            eos_token_ids=tuple(eos),
        )

    @classmethod
    def create(cls, config: EngineConfig) -> LLMEngine:
        """Load the base model named by the config and build the engine on it."""
        from peftserve.adapters.manager import AdapterManager
        from peftserve.model.loader import find_base_model, garbage_collection_paused
        from peftserve.store import AdapterStore

        if config.threads:
            torch.set_num_threads(config.threads)
        with garbage_collection_paused():  # see there: objects by the hundred thousand
            source = find_base_model(config.model, config.device, config.dtype)
            packed = None
            if config.packed_cache != "off":
                packed = PackedCache(config.packed_cache, source.directory, source.dtype)
            loaded = _read_model(source, packed if config.cpu_linear == "onednn" else None)
            manager = AdapterManager(
                loaded.model,
                config.slots,
                loaded.device,
                loaded.dtype,
                host_cache_bytes=int(config.host_cache_mb * 2**20),
                max_rank=config.adapter_max_rank,
                load_threads=config.adapter_load_threads,
                metrics_top_n=config.adapter_metrics_top_n,
            )
            store = None
            if config.store is not None:
                store = AdapterStore(config.store, config.max_adapters_per_tenant, config.max_upload_bytes)
                manager.scan(store)
            for adapter_id, path in config.adapters:  # after the store: these are the newest versions
                manager.register(adapter_id, path)
            return cls(
                loaded.model,
                loaded.tokenizer,
                config,
                model_id=loaded.model_id,
                adapters=manager,
                store=store,
                packed_cache=packed,
            )

    @classmethod
    def from_model(cls, model, tokenizer, config: EngineConfig | None = None, **kwargs) -> LLMEngine:
        """Serve an already built transformers model (tests and benchmarks)."""
        return cls(model, tokenizer, config or EngineConfig(), **kwargs)

    # -- read-only views ----------------------------------------------------------------------

    @property
    def model_info(self) -> ModelInfo:
        return replace(self._info, prefix_cache=self.prefix_cache_stats())

    def stats(self) -> EngineStats:
        alloc = self.scheduler.allocator
        return EngineStats(
            waiting=len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            kv_blocks_used=alloc.num_used,
            kv_blocks_free=alloc.num_free,
            prefix_cache=self.prefix_cache_stats(),
            warming=len(self.runner.warming),
        )

    def prefix_cache_stats(self) -> PrefixCacheStats:
        pool = self.scheduler.allocator
        counters = pool.counters
        return PrefixCacheStats(
            enabled=pool.caching,
            query_tokens=counters.query_tokens,
            hit_tokens=counters.hit_tokens,
            cached_blocks=pool.num_cached,
            evictions=counters.evictions,
        )

    def tokenize(self, text: str) -> list[int]:
        return encode(self.tokenizer, text)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- requests -------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Sequence:
        """Validate a request and build its sequence; raises InvalidRequest naming what to fix."""
        params = request.sampling
        params.validate(self._info.max_new_tokens_limit, self._info.vocab_size)
        if request.prompt_token_ids is not None:
            if request.prompt:
                raise InvalidRequest("give either prompt or prompt_token_ids, not both")
            prompt_ids = list(request.prompt_token_ids)
            bad = [t for t in prompt_ids if not 0 <= t < self._info.vocab_size]
            if bad:
                raise InvalidRequest(
                    f"prompt_token_ids: {bad[0]} is outside the vocabulary [0, {self._info.vocab_size})"
                )
        else:
            prompt_ids = self.tokenize(request.prompt) if request.prompt else []
        if not prompt_ids:
            raise InvalidRequest("prompt is empty; send at least one token of text")
        check_adapter_refs(request.adapters)
        seq = Sequence(
            request_id=request.request_id,
            prompt_ids=prompt_ids,
            sampling=params,
            tenant=request.tenant,
            limits=self.config.tenant_limits.over(request.limits),
        )
        if request.adapters:
            if self.adapters is None:
                raise AdapterNotFound(f"adapter {quote(request.adapters[0].adapter_id)} not found")
            self.adapters.bind(seq, request.adapters)
        try:
            self._check_context(seq, params)
        except BaseException:
            self.discard(seq)
            raise
        return seq

    def _check_context(self, seq: Sequence, params: SamplingParams) -> None:
        """The prompt (with prefix virtual tokens) and max_new_tokens fit the context."""
        context = seq.num_virtual + len(seq.prompt_ids)
        if context >= self.max_context:
            raise InvalidRequest(
                f"prompt is {context} tokens but the context holds {self.max_context}; shorten the prompt"
            )
        if context + params.max_new_tokens > self.max_context:
            raise InvalidRequest(
                f"prompt ({context} tokens) plus max_new_tokens ({params.max_new_tokens}) exceeds the"
                f" context of {self.max_context} tokens; lower max_new_tokens to at most"
                f" {self.max_context - context}"
            )

    def add_request(self, request: GenerationRequest) -> None:
        """prepare, then add_sequence (blocking while a cold adapter loads)."""
        seq = self.prepare(request)
        try:
            self.add_sequence(seq)
        except BaseException:
            self.discard(seq)
            raise

    def discard(self, seq: Sequence) -> None:
        """Release what prepare bound for a sequence that will not be (or could not be) queued."""
        if self.adapters is not None:
            self.adapters.unbind(seq, finished=False)

    def add_sequence(self, seq: Sequence) -> None:
        """Queue a prepared sequence; raises CapacityExceeded when the queue is full (then discard it).

        Its adapters must be in host memory: the async front awaits them off-thread first; otherwise
        this blocks while they load.
        """
        if len(self.scheduler.waiting) >= self.config.max_queue:
            raise CapacityExceeded(
                f"the request queue is full ({self.config.max_queue} waiting); retry later", retry_after_s=1.0
            )
        limits = seq.limits
        if limits.max_queued is not None and self.scheduler.waiting.queued(seq.tenant) >= limits.max_queued:
            raise CapacityExceeded(
                f"tenant {seq.tenant!r} has {limits.max_queued} requests waiting, its limit; retry when "
                "some have started",
                retry_after_s=1.0,
            )
        if self.scheduler.get(seq.request_id) is not None:
            raise InvalidRequest(f"request_id {quote(seq.request_id)} is already in flight; use a unique id")
        if self.adapters is not None and seq.adapter_keys:
            self.adapters.wait_host(seq)
        if limits.tokens_per_minute is not None:
            cost = len(seq.prompt_ids) + seq.sampling.max_new_tokens
            wait = self._tokens.take(seq.tenant, cost, limits.tokens_per_minute)
            if wait is not None:
                raise CapacityExceeded(
                    f"tenant {seq.tenant!r} is over its limit of {limits.tokens_per_minute} tokens per "
                    f"minute (this request counts {cost}: prompt plus max_new_tokens); retry in {wait:.1f} s",
                    retry_after_s=wait,
                )
        self._detok[seq.request_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_ids, stop=seq.sampling.stop
        )
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request; returns its last output, or None if it was not in flight."""
        seq = self.scheduler.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.CANCELLED)
        return self._output(seq, "", (), None)

    def abort_all(self) -> list[RequestOutput]:
        ids = [s.request_id for s in [*self.scheduler.running, *self.scheduler.waiting]]
        return [out for rid in ids if (out := self.abort(rid)) is not None]

    # -- the step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one engine step; returns an output for every sequence that sampled a token."""
        return self.step_with_output()[0]

    def step_with_output(self) -> tuple[list[RequestOutput], StepInput | None, StepOutput | None]:
        """One engine step, with what the runner was given and gave back (its logits among them).

        (outputs, None, None) when nothing was scheduled.
        """
        if self.adapters is not None:
            self.scheduler.reserved_slot_adapters = self.adapters.pinned_keys()
            self.scheduler.allocator.drop_versions(self.adapters.removed_versions())
        plan = self.scheduler.schedule()
        if self.adapters is not None:
            for seq in self.adapters.on_plan(plan):
                self.scheduler.requeue(seq, plan)
        if not plan.chunks:
            return [], None, None
        step = self._step_input(plan)
        output = self.runner.execute(step)
        self.scheduler.update(output)
        failed = [self._on_non_finite(seq) for seq in output.non_finite]
        outputs = [self._on_token(s.seq, s.token_id, s.logprob) for s in output.sampled] + failed
        return outputs, step, output

    def _step_input(self, plan) -> StepInput:
        """The packed step, with each delta sequence's slots and each admitted prefix's K/V."""
        if self.adapters is None:
            return pack(plan)
        step = pack(plan, self.adapters.slot_weights)
        prefixes = tuple(  # virtual entries in blocks found in the prefix cache are written already
            PrefixWrite(seq, self.adapters.prefix_kv(seq.prefix_adapter), start=seq.num_cached)
            for seq in plan.admitted
            if seq.num_virtual > seq.num_cached
        )
        return replace(step, prefixes=prefixes)

    def _on_non_finite(self, seq: Sequence) -> RequestOutput:
        """End a sequence whose logits were NaN/Inf with an error of its own; the batch carries on."""
        adapters = ", ".join(f"{held.key} x {held.weight:g}" for held in seq.deltas) or seq.prefix_adapter
        log.warning("request %s: non-finite logits (adapters: %s)", seq.request_id, adapters or "none")
        cause = f"its adapters ({adapters}) overflow" if adapters else "the model overflows"
        message = (
            f"this request's logits became NaN or Inf at output token {len(seq.output_ids) + 1}: {cause} "
            f"in {self._info.dtype} on this input; other requests are not affected"
        )
        self._finish(seq, FinishReason.ERROR)
        return replace(self._output(seq, "", (), None), error=NonFiniteOutput(message))

    def _on_token(self, seq: Sequence, token: int, logprob: float) -> RequestOutput:
        seq.output_ids.append(token)
        params = seq.sampling
        detok = self._detok[seq.request_id]
        text = detok.add(token)
        reason = None
        if token in params.stop_token_ids:
            reason = FinishReason.STOP
        elif token in self.eos_ids and not params.ignore_eos:
            reason = FinishReason.EOS
        elif detok.stopped:
            reason = FinishReason.STOP
        elif len(seq.output_ids) >= params.max_new_tokens:
            reason = FinishReason.LENGTH
        if reason is not None:
            text += detok.flush()
            self._finish(seq, reason)
        return self._output(seq, text, (token,), (logprob,) if params.logprobs else None)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        per_minute = seq.limits.tokens_per_minute
        if per_minute is not None:  # what it reserved and did not generate
            self._tokens.give_back(seq.tenant, seq.sampling.max_new_tokens - len(seq.output_ids), per_minute)
        self.scheduler.finish(seq, reason)
        self.runner.release(seq)
        if self.adapters is not None:
            self.adapters.unbind(seq)
        self._detok.pop(seq.request_id, None)

    def _output(self, seq: Sequence, text: str, tokens: tuple, logprobs: tuple | None) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=tokens,
            logprobs=logprobs,
            prompt_tokens=len(seq.prompt_ids),
            cached_tokens=seq.num_cached_prompt,
            completion_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason,
        )

    # -- convenience ----------------------------------------------------------------------------

    def generate_all(self, requests: list[GenerationRequest]) -> dict[str, Completion]:
        """Run requests to completion; for tests, benchmarks and offline batches."""
        for request in requests:
            self.add_request(request)
        done: dict[str, Completion] = {}
        partial: dict[str, list[RequestOutput]] = {r.request_id: [] for r in requests}
        while self.has_unfinished():
            for out in self.step():
                partial[out.request_id].append(out)
                if out.finished:
                    done[out.request_id] = _gather(partial.pop(out.request_id))
        return done

    def warmup(self) -> None:
        """Run one short request through every path so the first user request is not slow (what the
        kernels compile, the runner's warm-up has built); none while the runner warms up in the
        background (the paths change as it goes on: the first user request goes through them as soon as
        the engine serves, rather than after a request of its own)."""
        if self.runner.background_warm_up:
            return
        request_id = f"warmup-{uuid.uuid4().hex}"
        self.generate_all(
            [
                GenerationRequest(
                    request_id=request_id,
                    prompt_token_ids=[0, 1, 2],
                    sampling=SamplingParams(max_new_tokens=2, ignore_eos=True),
                )
            ]
        )


def _read_model(source: BaseModelSource, packed: PackedCache | None) -> LoadedModel:
    """The base model, its Linear layers on the packed weights an earlier start kept in `packed`, where
    there are (on CPU): their plain weights are then not read from the checkpoint, so a start reads
    from the disk what loading the model would, and no more. Read whole where none are kept, or where
    the entry fails restore's checks (it is then removed, and the runner packs and keeps them anew)."""
    unread = packed.prefetch() if packed is not None and source.device.type == "cpu" else frozenset()
    loaded = read_base_model(source, unread)
    if loaded.unread and not packed.restore(loaded.model, loaded.unread):
        log.warning("reading %s again, whole: the packed weights kept were not usable", source.model_id)
        loaded = read_base_model(source)
    return loaded


def _gather(outputs: list[RequestOutput]) -> Completion:
    last = outputs[-1]
    return Completion(
        request_id=last.request_id,
        text="".join(o.text for o in outputs),
        token_ids=[t for o in outputs for t in o.token_ids],
        logprobs=[lp for o in outputs for lp in (o.logprobs or ())],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        cached_tokens=last.cached_tokens,
    )
