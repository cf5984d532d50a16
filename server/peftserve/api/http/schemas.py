"""Request bodies of the OpenAI-compatible API as pydantic models (responses are built in translate.py).

Every model forbids unknown fields, so a parameter peftserve does not implement is a 400 naming it,
never silently ignored. OpenAI parameters that peftserve cannot honour are accepted only at their
neutral value (n=1, presence_penalty=0, ...), which changes nothing. peftserve's own options arrive as
extra body fields (the openai client's extra_body): top_k, repetition_penalty, ignore_eos,
stop_token_ids and adapters (a weighted mixture).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _check_neutral(value: object, neutral: tuple[object, ...], message: str) -> object:
    if value not in neutral:
        raise ValueError(message)
    return value


def _only(*neutral: object, message: str) -> AfterValidator:
    """Accept the field only at a neutral value (null counts as one): anything else is a 400 saying why."""
    return AfterValidator(lambda value: _check_neutral(value, (None, *neutral), message))


Int32 = Annotated[int, Field(ge=-(2**31), lt=2**31)]
"""The gRPC API's int32 range: values in it are the engine's to check, with gRPC's messages."""
_PENALTY = "only 0 is supported: use repetition_penalty (an extra body field)"
_TOP_LOGPROBS = "only 0 is supported: each generated token's own log-probability, no alternatives"


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Body):
    include_usage: bool = False
    """Send one more chunk before [DONE] with the usage of the whole request (choices empty)."""


class _Generation(_Body):
    """What completions and chat completions share: the model, sampling, streaming, peftserve extras."""

    model: str = Field(max_length=256)
    """The base model's id, or an adapter: 'tenant/name', 'name' (the caller's tenant), '...@v2'."""
    temperature: float | None = None
    top_p: float | None = None
    seed: Annotated[int, Field(ge=0, lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    """An end-user id for the caller's own records; it changes nothing."""
    n: Annotated[int | None, _only(1, message="only n=1 is supported: one choice per request")] = None
    presence_penalty: Annotated[float | None, _only(0, message=_PENALTY)] = None
    frequency_penalty: Annotated[float | None, _only(0, message=_PENALTY)] = None
    logit_bias: Annotated[dict[str, float] | None, _only({}, message="logit_bias is not supported")] = None
    # peftserve's own options (extra_body)
    top_k: Int32 | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Int32] | None = None
    adapters: dict[str, float] | None = None
    """A weighted LoRA mixture {adapter id: weight}, computed unmerged; model then names the base model."""


class CompletionRequest(_Generation):
    """POST /v1/completions."""

    prompt: str | list[Int32] | list[str] | list[list[Int32]]
    """Text or token ids; a list of several prompts is refused (one prompt per request)."""
    max_tokens: Int32 | None = None
    logprobs: Annotated[int | None, _only(0, message=_TOP_LOGPROBS)] = None
    """0: each generated token's own log-probability (tokens, token_logprobs, text_offset)."""
    echo: Annotated[bool | None, _only(False, message="echo is not supported")] = None
    suffix: Annotated[str | None, _only("", message="suffix (insertion) is not supported")] = None
    best_of: Annotated[int | None, _only(1, message="only best_of=1 is supported")] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None


class ChatCompletionRequest(_Generation):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int32 | None = None
    max_completion_tokens: Int32 | None = None
    """OpenAI's newer name of max_tokens; give one of them."""
    logprobs: bool = False
    top_logprobs: Annotated[int | None, _only(0, message=_TOP_LOGPROBS)] = None


class LoadRequest(_Body):
    """POST /v1/adapters/{id}/load."""

    pin: bool = False
    """Keep it in its device slot until unloaded."""
