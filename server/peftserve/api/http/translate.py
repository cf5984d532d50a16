"""OpenAI request bodies ⇒ the engine's GenerationRequest; engine outputs ⇒ OpenAI response objects.

Plain functions and small writers over plain dicts: no I/O and no FastAPI, so they test without a
server. Values the engine validates (max_new_tokens, temperature, top_p, stop strings ...) are passed
through unchecked, so their errors read exactly as over gRPC.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from peftserve.api import adapter_ids, convert
from peftserve.api.http.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from peftserve.auth import Caller
from peftserve.engine.protocol import ModelInfo
from peftserve.engine.request import (
    AdapterRef,
    FinishReason,
    GenerationRequest,
    RequestOutput,
    SamplingParams,
    merged,
)
from peftserve.errors import InvalidRequest, quote
from peftserve_client._proto import peftserve_pb2 as pb

DEFAULT_TEMPERATURE = 1.0
"""OpenAI's default when a request gives none (the gRPC API's is 0, greedy): send 0 for greedy."""
DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default max_tokens of /v1/completions; chat completions default to the rest of the context."""

_FINISH_REASONS = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
    FinishReason.CANCELLED: "abort",
}
"""OpenAI has no eos: the model stopping by itself is 'stop'. 'abort': cancelled by a draining server."""

TokenStrings = Callable[[list[int]], list[str]]
"""The text of each token on its own (EngineClient.token_strings)."""
ChatPrompt = Callable[[list[dict[str, str]]], list[int]]
"""Token ids of a conversation in the model's chat template (EngineClient.chat_prompt)."""


@dataclass(frozen=True)
class Target:
    """What a request's model (and adapters) name: the engine's adapters, and the name responses carry."""

    model: str
    adapters: tuple[AdapterRef, ...]


def target(model: str, adapters: dict[str, float] | None, base_model: str, caller: Caller) -> Target:
    """The base model, one adapter (by id as the caller wrote it), or a weighted mixture on the base."""
    if adapters is not None:
        if model != base_model:
            raise InvalidRequest(
                f"a mixture in adapters runs on the base model: set model to {quote(base_model)},"
                f" got {quote(model)}"
            )
        return Target(base_model, mixture(adapters, lambda text: adapter_ids.resolve(text, caller)))
    if model == base_model:
        return Target(base_model, ())
    full_id = adapter_ids.resolve(model, caller)
    return Target(full_id, (AdapterRef(full_id),))


def mixture(adapters: dict[str, float], resolve: convert.IdResolver) -> tuple[AdapterRef, ...]:
    """A mixture's adapters, checked by the gRPC API's own rules (count, finite weights, duplicates)."""
    weights = [pb.AdapterWeight(adapter_id=i, weight=w) for i, w in adapters.items()]
    return convert.to_adapters(pb.GenerateRequest(adapters=weights), resolve)


def sampling(
    body: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, logprobs: bool
) -> SamplingParams:
    """SamplingParams under their OpenAI names; unset options take SamplingParams' defaults."""
    given = {
        "temperature": DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        "top_p": body.top_p,
        "top_k": body.top_k,
        "seed": body.seed,
        "repetition_penalty": body.repetition_penalty,
    }
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        **{name: value for name, value in given.items() if value is not None},
        stop=tuple(stop),
        stop_token_ids=tuple(body.stop_token_ids or ()),
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def completion_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> str | list[int]:
    """The one prompt of a completion request: text or token ids (a list of one prompt is unwrapped)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
        if len(prompt) != 1:
            raise InvalidRequest(f"prompt: one prompt per request, got a list of {len(prompt)}")
        prompt = prompt[0]
    if not prompt:
        raise InvalidRequest("prompt must not be empty")
    return prompt


def completion_request(
    body: CompletionRequest, caller: Caller, info: ModelInfo
) -> tuple[GenerationRequest, Target]:
    """The engine's request for POST /v1/completions, and what it targets."""
    prompt = completion_prompt(body.prompt)
    to = target(body.model, body.adapters, info.model_id, caller)
    max_new_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt=prompt if isinstance(prompt, str) else "",
        prompt_token_ids=None if isinstance(prompt, str) else list(prompt),
        sampling=sampling(body, max_new_tokens, logprobs=body.logprobs is not None),
        adapters=to.adapters,
        tenant=caller.tenant,
    )
    return request, to


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Messages as chat templates take them; text parts are joined, 'developer' is OpenAI's new 'system'."""
    rendered = []
    for message in messages:
        content = message.content or ""
        if not isinstance(content, str):
            content = "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        rendered.append({"role": role, "content": content})
    return rendered


def chat_request(
    body: ChatCompletionRequest, caller: Caller, info: ModelInfo, chat_prompt: ChatPrompt
) -> tuple[GenerationRequest, Target]:
    """The engine's request for POST /v1/chat/completions: the conversation in the chat template."""
    if body.max_tokens is not None and body.max_completion_tokens is not None:
        raise InvalidRequest("give max_tokens or max_completion_tokens, not both")
    to = target(body.model, body.adapters, info.model_id, caller)
    prompt_ids = chat_prompt(chat_messages(body.messages))
    max_new_tokens = body.max_completion_tokens if body.max_tokens is None else body.max_tokens
    if max_new_tokens is None:  # the rest of the context, as far as the server's limit allows
        max_new_tokens = max(1, min(info.max_new_tokens_limit, info.max_context - len(prompt_ids)))
    request = GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=prompt_ids,
        sampling=sampling(body, max_new_tokens, logprobs=body.logprobs),
        adapters=to.adapters,
        tenant=caller.tenant,
    )
    return request, to


def finish_reason(output: RequestOutput) -> str | None:
    return _FINISH_REASONS[output.finish_reason] if output.finish_reason else None


def usage(output: RequestOutput) -> dict[str, Any]:
    return {
        "prompt_tokens": output.prompt_tokens,
        "completion_tokens": output.completion_tokens,
        "total_tokens": output.prompt_tokens + output.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": output.cached_tokens},
    }


class Writer:
    """The response objects of one request: ids and creation time fixed once, chunks built per output."""

    id_prefix = ""
    object_name = ""
    chunk_object_name = ""

    def __init__(self, request_id: str, model: str, token_strings: TokenStrings) -> None:
        self.id = f"{self.id_prefix}-{request_id}"
        self.model = model
        self.created = int(time.time())
        self._token_strings = token_strings

    def _envelope(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(self, output: RequestOutput, include_usage: bool = False) -> dict[str, Any]:
        """One streamed increment; with include_usage its usage is null (the usage chunk comes last)."""
        chunk = self._envelope(self.chunk_object_name, [self._chunk_choice(output)])
        if include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, last: RequestOutput) -> dict[str, Any]:
        """The chunk stream_options.include_usage asks for: no choices, the whole request's usage."""
        return {**self._envelope(self.chunk_object_name, []), "usage": usage(last)}

    def response(self, outputs: Sequence[RequestOutput]) -> dict[str, Any]:
        """The whole response of a request that is not streamed."""
        whole = merged(outputs)
        return {**self._envelope(self.object_name, [self._choice(whole)]), "usage": usage(whole)}

    def _chunk_choice(self, output: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def _choice(self, output: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def _tokens(self, output: RequestOutput) -> list[tuple[str, float]]:
        """(text, logprob) of each token of an output that carries logprobs."""
        return list(zip(self._token_strings(list(output.token_ids)), output.logprobs or (), strict=True))


class CompletionWriter(Writer):
    """text_completion objects; logprobs in the legacy shape (tokens, token_logprobs, text_offset)."""

    id_prefix = "cmpl"
    object_name = chunk_object_name = "text_completion"

    def __init__(self, request_id: str, model: str, token_strings: TokenStrings) -> None:
        super().__init__(request_id, model, token_strings)
        self._offset = 0
        """Characters of completion text before the next chunk's first token (text_offset)."""

    def _chunk_choice(self, output: RequestOutput) -> dict[str, Any]:
        return {
            "index": 0,
            "text": output.text,
            "logprobs": self._logprobs(output),
            "finish_reason": finish_reason(output),
        }

    _choice = _chunk_choice

    def _logprobs(self, output: RequestOutput) -> dict[str, Any] | None:
        if output.logprobs is None:
            return None
        tokens = self._tokens(output)
        offsets = []
        for text, _ in tokens:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": [text for text, _ in tokens],
            "token_logprobs": [lp for _, lp in tokens],
            "top_logprobs": [{text: lp} for text, lp in tokens],
            "text_offset": offsets,
        }


class ChatWriter(Writer):
    """chat.completion objects; the first streamed delta carries the assistant role."""

    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def __init__(self, request_id: str, model: str, token_strings: TokenStrings) -> None:
        super().__init__(request_id, model, token_strings)
        self._role_sent = False

    def _chunk_choice(self, output: RequestOutput) -> dict[str, Any]:
        delta = {"content": output.text}
        if not self._role_sent:
            delta = {"role": "assistant", **delta}
            self._role_sent = True
        return {
            "index": 0,
            "delta": delta,
            "logprobs": self._logprobs(output),
            "finish_reason": finish_reason(output),
        }

    def _choice(self, output: RequestOutput) -> dict[str, Any]:
        message = {"role": "assistant", "content": output.text}
        return {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(output),
            "finish_reason": finish_reason(output),
        }

    def _logprobs(self, output: RequestOutput) -> dict[str, Any] | None:
        if output.logprobs is None:
            return None
        content = [
            {"token": text, "logprob": lp, "bytes": _utf8(text), "top_logprobs": []}
            for text, lp in self._tokens(output)
        ]
        return {"content": content, "refusal": None}


def _utf8(text: str) -> list[int] | None:
    """A token's bytes, unless it is part of a character (decoded alone it is U+FFFD)."""
    return None if "\ufffd" in text else list(text.encode())
