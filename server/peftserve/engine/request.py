"""What a generation request is, and what it yields, in plain Python (no torch)."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from peftserve.errors import InvalidRequest, PeftServeError, quote
from peftserve.store.ids import DEFAULT_TENANT

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_MIXTURE_ADAPTERS = 8
MAX_MIXTURE_WEIGHT = 10.0
"""Mixture weights lie in [-MAX_MIXTURE_WEIGHT, MAX_MIXTURE_WEIGHT]: merging adapters with weights far
outside [0, 1] only amplifies them, and unbounded weights overflow the activations."""


class FinishReason(str, enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    EOS = "eos"
    CANCELLED = "cancelled"
    ERROR = "error"
    """The request failed mid-generation (RequestOutput.error says why); the API reports an error status."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next tokens."""

    max_new_tokens: int = 64
    """Tokens to generate at most."""
    temperature: float = 0.0
    """0 samples greedily; otherwise logits are divided by it."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    seed: int | None = None
    """Seed of this request's own generator; None draws one."""
    repetition_penalty: float = 1.0
    """> 1 discourages tokens already seen (prompt and output), as in transformers."""
    stop: tuple[str, ...] = ()
    """Stop before any of these strings; they are not part of the text."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop after any of these tokens."""
    ignore_eos: bool = False
    """Keep generating past EOS."""
    logprobs: bool = False
    """Report each generated token's log-probability (of the distribution sampled from)."""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_new_tokens_limit: int, vocab_size: int) -> None:
        """Raise InvalidRequest naming the field to fix."""
        if self.max_new_tokens <= 0:
            raise InvalidRequest(f"max_new_tokens must be > 0, got {self.max_new_tokens}")
        if self.max_new_tokens > max_new_tokens_limit:
            raise InvalidRequest(
                f"max_new_tokens must be <= {max_new_tokens_limit}, got {self.max_new_tokens}"
            )
        if not self.temperature >= 0.0 or self.temperature != self.temperature:
            raise InvalidRequest(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequest(
                f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty}"
            )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest(f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not s:
                raise InvalidRequest("stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise InvalidRequest(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters")
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidRequest(
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(self.stop_token_ids)}"
            )
        for t in self.stop_token_ids:
            if not 0 <= t < vocab_size:
                raise InvalidRequest(f"stop_token_ids: {t} is outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True)
class AdapterRef:
    """One adapter named by a request, with its mixture weight (1.0 for a single adapter)."""

    adapter_id: str
    weight: float = 1.0


def check_adapter_refs(refs: tuple[AdapterRef, ...]) -> None:
    """The adapters of one request: at most MAX_MIXTURE_ADAPTERS, each once, weights bounded."""
    if len(refs) > MAX_MIXTURE_ADAPTERS:
        raise InvalidRequest(f"at most {MAX_MIXTURE_ADAPTERS} adapters in a mixture, got {len(refs)}")
    for ref in refs:
        if not -MAX_MIXTURE_WEIGHT <= ref.weight <= MAX_MIXTURE_WEIGHT:  # also false for NaN
            raise InvalidRequest(
                f"adapters: the weight of {quote(ref.adapter_id)} must be a number in "
                f"[{-MAX_MIXTURE_WEIGHT:g}, {MAX_MIXTURE_WEIGHT:g}], got {ref.weight:g}"
            )
    if len({r.adapter_id for r in refs}) != len(refs):
        raise InvalidRequest("adapters: each adapter may appear once in a request")


@dataclass(frozen=True)
class TenantLimits:
    """What one tenant may hold in the engine at once, and use per minute; None is unlimited.

    Server-wide defaults come from EngineConfig; an API key may set its own (keys file), which win.
    """

    max_queued: int | None = None
    """Requests waiting for admission; beyond it new ones are RESOURCE_EXHAUSTED."""
    max_running: int | None = None
    """Requests running at once; the others wait in the queue."""
    tokens_per_minute: int | None = None
    """Prompt plus max_new_tokens of the requests queued in any minute (unused tokens come back)."""

    def __post_init__(self) -> None:
        for name in ("max_queued", "max_running", "tokens_per_minute"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or unset, got {value!r}")

    def over(self, other: TenantLimits | None) -> TenantLimits:
        """These limits with every field other sets taking its place."""
        if other is None:
            return self
        return TenantLimits(
            *(
                theirs if theirs is not None else mine
                for mine, theirs in (
                    (self.max_queued, other.max_queued),
                    (self.max_running, other.max_running),
                    (self.tokens_per_minute, other.tokens_per_minute),
                )
            )
        )


@dataclass
class GenerationRequest:
    """A request as the API hands it to the engine: prompt text or token ids, never both."""

    request_id: str
    prompt: str = ""
    prompt_token_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    adapters: tuple[AdapterRef, ...] = ()
    """Empty: the base model. One: that adapter. Several: a weighted mixture (no prefix tuning in one)."""
    tenant: str = DEFAULT_TENANT
    """The authenticated caller's tenant: the scheduler shares the engine fairly between tenants."""
    limits: TenantLimits | None = None
    """The caller's own limits (its API key's), over the engine's defaults; None: the defaults."""


@dataclass(frozen=True)
class RequestOutput:
    """One increment of a request's result, streamed from the engine to the API."""

    request_id: str
    text: str
    """Text added by this increment; increments concatenate to the final text."""
    token_ids: tuple[int, ...]
    """Tokens generated in this increment."""
    logprobs: tuple[float, ...] | None
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far, this increment included."""
    finish_reason: FinishReason | None = None
    """Set on the last increment only."""
    error: PeftServeError | None = None
    """With finish_reason ERROR: the error the caller gets instead of this increment."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (not computed)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def merged(outputs: Sequence[RequestOutput]) -> RequestOutput:
    """Consecutive increments of one request as one (the last one's finish reason and counts)."""
    if len(outputs) == 1:
        return outputs[0]
    last = outputs[-1]
    logprobs = [lp for o in outputs for lp in (o.logprobs or ())] if last.logprobs is not None else None
    return RequestOutput(
        request_id=last.request_id,
        text="".join(o.text for o in outputs),
        token_ids=tuple(t for o in outputs for t in o.token_ids),
        logprobs=tuple(logprobs) if logprobs is not None else None,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        cached_tokens=last.cached_tokens,
        finish_reason=last.finish_reason,
    )
