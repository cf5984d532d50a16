"""An EngineClient without a model, for API tests: it echoes the prompt back one token at a time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from peftserve.engine.protocol import EngineStats, ModelInfo
from peftserve.engine.request import FinishReason, GenerationRequest, RequestOutput, check_adapter_refs
from peftserve.errors import AdapterNotFound, CapacityExceeded, InvalidRequest, Unavailable

VOCAB_SIZE = 256
"""Token id = byte value of the prompt's UTF-8 encoding."""
MAX_NEW_TOKENS_LIMIT = 64


class FakeEngine:
    """Echoes prompt tokens cyclically; knobs make it slow, fail, or full, and it records aborts."""

    def __init__(
        self,
        adapters: tuple[str, ...] = ("default/lora-a", "acme/lora-a", "globex/lora-g"),
        token_delay_s: float = 0.0,
    ) -> None:
        self.adapters = set(adapters)
        """Full ids (tenant/name): the servicer resolves what callers write before the engine sees it."""
        self.token_delay_s = token_delay_s
        """Sleep before each token, so streams can be cancelled mid-way."""
        self.fail_with: Exception | None = None
        """Raised at the first iteration of the next generate() calls."""
        self.fail_next: list[Exception] = []
        """Raised at the first iteration of the next calls, one each, before fail_with."""
        self.fail_mid_stream: Exception | None = None
        """Raised after the first token of the next calls."""
        self.queue_full = False
        self.draining = False
        self.admin = None
        """No Adapters service: admin tests use tests/api/fake_admin.py with create_server directly."""
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        """Ids of requests whose stream was closed before they finished."""
        self.running = 0
        self.has_chat_template = True
        self.attempts = 0
        """generate() calls that reached admission, failed or not."""

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(
            model_id="fake",
            family="echo",
            vocab_size=VOCAB_SIZE,
            max_context=512,
            max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
            dtype="float32",
            device="cpu",
            num_layers=1,
            hidden_size=8,
            kv_blocks_total=32,
            kv_block_size=16,
            eos_token_ids=(0,),
        )

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode())

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return [bytes([t]).decode("latin-1") for t in token_ids]

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """'role: content' lines, then 'assistant:'; InvalidRequest when has_chat_template is off."""
        if not self.has_chat_template:
            raise InvalidRequest("this model has no chat template")
        return self.tokenize("".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:")

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=0, running=self.running, kv_blocks_used=self.running, kv_blocks_free=7, warming=2
        )

    async def drain(self, grace_s: float) -> None:
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        while self.running and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def shutdown(self) -> None:
        self.shut_down = True

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        return self._generate(request)

    def _admit(self, request: GenerationRequest) -> None:
        """The checks a real engine does before queueing a request."""
        self.attempts += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        if self.fail_with is not None:
            raise self.fail_with
        if self.draining:
            raise Unavailable("server is draining")
        if self.queue_full:
            raise CapacityExceeded("queue is full (1024 waiting)")
        request.sampling.validate(MAX_NEW_TOKENS_LIMIT, VOCAB_SIZE)
        check_adapter_refs(request.adapters)  # as the real engine, whichever front door it came through
        for ref in request.adapters:
            if ref.adapter_id not in self.adapters:
                raise AdapterNotFound(f"adapter {ref.adapter_id!r} not found")

    async def _generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]:
        self._admit(request)
        self.requests.append(request)
        prompt = request.prompt_token_ids or self.tokenize(request.prompt)
        sampling = request.sampling
        self.running += 1
        finished = False
        try:
            for i in range(sampling.max_new_tokens):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                token = prompt[i % len(prompt)]
                reason = None
                if i == 1 and self.fail_mid_stream is not None:
                    raise self.fail_mid_stream
                if token in sampling.stop_token_ids:
                    reason = FinishReason.STOP
                elif i + 1 == sampling.max_new_tokens:
                    reason = FinishReason.LENGTH
                finished = reason is not None
                yield RequestOutput(
                    request_id=request.request_id,
                    text=self.token_strings([token])[0],
                    token_ids=(token,),
                    logprobs=(-0.5,) if sampling.logprobs else None,
                    prompt_tokens=len(prompt),
                    completion_tokens=i + 1,
                    finish_reason=reason,
                )
                if finished:
                    return
        finally:
            self.running -= 1
            if not finished:
                self.aborted.append(request.request_id)
