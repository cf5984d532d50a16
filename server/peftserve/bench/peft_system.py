"""Hugging Face PEFT used directly, the way a user without a server would serve many LoRA adapters.

Two policies over one PeftModel holding every adapter the traces use, each replaying the trace in
real time (a request cannot start before it arrives):

- one at a time: ``set_adapter(name)`` + ``generate`` per request, in arrival order;
- static batches: up to `batch_size` requests that have arrived when the previous batch ends,
  left-padded, one ``generate(..., adapter_names=[...])`` per batch, run to its longest output.

Token times come from a streamer (one timestamp per decoding step), so TTFT and TPOT are what a
streaming client would see; a row's last token is the step that produced its own last token.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import GenerationConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from peftserve.bench.adapters import PublishedPool
from peftserve.bench.records import RequestRecord
from peftserve.bench.workload import TraceRequest


class StepClock(BaseStreamer):
    """Records when each decoding step's tokens are ready (the prompt, put first, is skipped)."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter() - self.start)
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _greedy(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)


def _wait_until(start: float, at: float) -> None:
    delay = start + at - time.perf_counter()
    if delay > 0:
        time.sleep(delay)


def _record(request: TraceRequest, times: Sequence[float]) -> RequestRecord:
    tokens = min(request.output_len, len(times))
    return RequestRecord(
        request.index,
        request.arrival,
        len(request.prompt_ids),
        tokens,
        times[0] if times else None,
        times[tokens - 1] if tokens else None,
        None if tokens == request.output_len else f"generated {tokens} of {request.output_len} tokens",
    )


class PeftBaseline:
    """A PeftModel over the benchmark's base model with the adapters the traces name, by PEFT name."""

    def __init__(self, base: PreTrainedModel) -> None:
        self._base = base
        self.model: PeftModel | None = None
        self.names: set[str] = set()

    def load(self, published: PublishedPool, indices: Sequence[int]) -> None:
        """Load the pool's adapters `indices` (once each) from their PEFT directories."""
        for i in sorted(set(indices)):
            name = published.peft_name(i)
            if name in self.names:
                continue
            directory = str(published.directories[i])
            if self.model is None:
                self.model = PeftModel.from_pretrained(self._base, directory, adapter_name=name).eval()
            else:
                self.model.load_adapter(directory, adapter_name=name)
            self.names.add(name)

    def _peft(self) -> PeftModel:
        if self.model is None:
            raise RuntimeError("no adapter loaded into the PEFT baseline")
        return self.model

    @torch.inference_mode()
    def one_at_a_time(self, trace: Sequence[TraceRequest], names: Sequence[str]) -> list[RequestRecord]:
        """set_adapter + generate per request, in arrival order; names[trace[i].adapter] is its adapter."""
        model = self._peft()
        device = model.device
        records = []
        start = time.perf_counter()
        for request in trace:
            _wait_until(start, request.arrival)
            model.set_adapter(names[request.adapter])
            ids = torch.tensor([request.prompt_ids], device=device)  # [1, P]
            clock = StepClock(start)
            model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                generation_config=_greedy(request.output_len),
                streamer=clock,
            )
            records.append(_record(request, clock.times))
        return records

    @torch.inference_mode()
    def static_batches(
        self, trace: Sequence[TraceRequest], names: Sequence[str], batch_size: int
    ) -> list[RequestRecord]:
        """Batches of the requests already arrived (up to batch_size), one adapter_names= generate each."""
        model = self._peft()
        device = model.device
        pending = deque(sorted(trace, key=lambda r: r.arrival))
        records = []
        start = time.perf_counter()
        while pending:
            _wait_until(start, pending[0].arrival)
            now = time.perf_counter() - start
            batch = []
            while pending and len(batch) < batch_size and pending[0].arrival <= now:
                batch.append(pending.popleft())
            width = max(len(r.prompt_ids) for r in batch)
            pads = [width - len(r.prompt_ids) for r in batch]
            ids = torch.tensor([[0] * p + list(r.prompt_ids) for p, r in zip(pads, batch, strict=True)])
            mask = torch.tensor([[0] * p + [1] * (width - p) for p in pads])  # [B, W]
            clock = StepClock(start)
            model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                generation_config=_greedy(max(r.output_len for r in batch)),
                adapter_names=[names[r.adapter] for r in batch],
                streamer=clock,
            )
            records += [_record(r, clock.times) for r in batch]
        return sorted(records, key=lambda r: r.index)
