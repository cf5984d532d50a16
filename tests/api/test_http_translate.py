"""The HTTP front's pure parts: error statuses, request translation, response writers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from peftserve import errors
from peftserve.api import status
from peftserve.api.http import translate
from peftserve.api.http.errors import error_of, http_status
from peftserve.api.http.schemas import ChatMessage
from peftserve.auth import LOCAL_CALLER, Caller
from peftserve.engine.request import AdapterRef, FinishReason, RequestOutput, check_adapter_refs
from peftserve.engine.request import merged as merge

GRPC_TO_HTTP = {
    "INVALID_ARGUMENT": {400},
    "NOT_FOUND": {404},
    "RESOURCE_EXHAUSTED": {413, 429},
    "FAILED_PRECONDITION": {400},
    "UNAVAILABLE": {503},
    "UNAUTHENTICATED": {401},
    "PERMISSION_DENIED": {403},
    "INTERNAL": {500},
}


@pytest.mark.parametrize("klass", [*status._CODES, errors.AdapterRejected, errors.PayloadTooLarge])
def test_every_error_class_has_an_http_status_agreeing_with_its_grpc_code(klass: type) -> None:
    exc = klass("x")
    assert http_status(exc) in GRPC_TO_HTTP[status.code_of(exc).name]


def test_errors_carry_grpcs_message_and_code() -> None:
    code, body = error_of(errors.CapacityExceeded("queue is full", retry_after_s=2))
    assert code == 429
    assert body == {
        "error": {
            "message": "queue is full",
            "type": "rate_limit_error",
            "param": None,
            "code": "resource_exhausted",
        }
    }
    assert status.retry_after(errors.CapacityExceeded("x", retry_after_s=0.2)) == "1"
    code, body = error_of(RuntimeError("a bug with a secret path /srv/x"))
    assert code == 500 and body["error"]["message"] == status.INTERNAL_MESSAGE


def test_the_target_of_model_and_adapters() -> None:
    acme = Caller("acme")
    assert translate.target("base", None, "base", acme) == translate.Target("base", ())
    assert translate.target("sup", None, "base", acme) == translate.Target(
        "acme/sup", (AdapterRef("acme/sup"),)
    )
    pinned = translate.target("sup@v2", None, "base", acme)
    assert pinned.adapters == (AdapterRef("acme/sup@v2"),)
    with pytest.raises(errors.AdapterNotFound):
        translate.target("globex/sup", None, "base", acme)
    assert translate.target("globex/sup", None, "base", LOCAL_CALLER).model == "globex/sup"
    mixed = translate.target("base", {"a": 0.25, "globex/b": 0.75}, "base", LOCAL_CALLER)
    assert mixed.adapters == (AdapterRef("default/a", 0.25), AdapterRef("globex/b", 0.75))
    twice = translate.target("base", {"a": 0.5, "default/a": 0.5}, "base", LOCAL_CALLER)
    with pytest.raises(errors.InvalidRequest, match="each adapter may appear once"):
        check_adapter_refs(twice.adapters)  # the engine's check, whatever the front door
    infinite = translate.target("base", {"a": float("inf")}, "base", LOCAL_CALLER)
    with pytest.raises(errors.InvalidRequest, match="must be a number in"):
        check_adapter_refs(infinite.adapters)


def test_completion_prompts() -> None:
    assert translate.completion_prompt("hi") == "hi"
    assert translate.completion_prompt([1, 2]) == [1, 2]
    assert translate.completion_prompt(["hi"]) == "hi"
    assert translate.completion_prompt([[3]]) == [3]
    for empty in ("", [], [""]):
        with pytest.raises(errors.InvalidRequest, match="must not be empty"):
            translate.completion_prompt(empty)
    with pytest.raises(errors.InvalidRequest, match="one prompt per request"):
        translate.completion_prompt([[1], [2]])


def test_chat_messages() -> None:
    messages = [
        ChatMessage(role="developer", content="d"),
        ChatMessage(role="user", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]),
        ChatMessage(role="assistant", content=None),
    ]
    assert translate.chat_messages(messages) == [
        {"role": "system", "content": "d"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": ""},
    ]


def out(text: str, ids: tuple[int, ...], done: FinishReason | None = None, n: int = 1) -> RequestOutput:
    return RequestOutput("r", text, ids, (-1.0,) * len(ids), 3, n, done)


def test_writers() -> None:
    strings = lambda ids: [chr(i) for i in ids]  # noqa: E731
    completion = translate.CompletionWriter("r", "m", strings)
    first = completion.chunk(out("ab", (97, 98)))
    second = completion.chunk(out("c", (99,), FinishReason.EOS, 3), include_usage=True)
    assert first["choices"][0]["logprobs"]["text_offset"] == [0, 1]
    assert second["choices"][0]["logprobs"]["text_offset"] == [2]
    assert second["choices"][0]["finish_reason"] == "stop" and second["usage"] is None
    assert completion.usage_chunk(out("", (), FinishReason.EOS, 3))["usage"]["total_tokens"] == 6

    chat = translate.ChatWriter("r", "m", strings)
    whole = chat.response([out("a", (97,)), out("b", (98,), FinishReason.CANCELLED, 2)])
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "ab"}
    assert whole["choices"][0]["finish_reason"] == "abort"
    assert [t["token"] for t in whole["choices"][0]["logprobs"]["content"]] == ["a", "b"]
    assert whole["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    cached = replace(out("b", (98,), FinishReason.EOS, 2), cached_tokens=2)
    assert chat.usage_chunk(cached)["usage"]["prompt_tokens_details"] == {"cached_tokens": 2}
    assert whole["id"].startswith("chatcmpl-") and whole["object"] == "chat.completion"


def _streamed(chunks: list[dict]) -> tuple[str, list, list]:
    """What a client reads from chunks: the text, each token's logprob entry, the finish reasons."""
    choices = [c["choices"][0] for c in chunks]
    text = "".join(c["text"] if "text" in c else c["delta"]["content"] for c in choices)
    tokens = []
    for logprobs in (c["logprobs"] for c in choices):
        if "content" in logprobs:  # chat
            tokens += logprobs["content"]
        else:
            tokens += zip(
                logprobs["tokens"], logprobs["token_logprobs"], logprobs["text_offset"], strict=True
            )
    return text, tokens, [c["finish_reason"] for c in choices]


@pytest.mark.parametrize("writer_class", [translate.CompletionWriter, translate.ChatWriter])
def test_chunks_of_merged_increments_read_as_the_unmerged_stream(
    writer_class: type[translate.Writer],
) -> None:
    """A lagging stream gets increments merged by the engine: fewer chunks, the same content."""
    strings = lambda ids: [chr(i) for i in ids]  # noqa: E731
    increments = [out(c, (ord(c),), None, i + 1) for i, c in enumerate("abcd")]
    increments.append(out("e", (ord("e"),), FinishReason.LENGTH, 5))
    one_by_one, lagging = writer_class("r", "m", strings), writer_class("r", "m", strings)
    unmerged = [one_by_one.chunk(o, include_usage=True) for o in increments]
    merged = [lagging.chunk(o, include_usage=True) for o in (increments[0], merge(increments[1:]))]
    text, tokens, _ = _streamed(unmerged)
    assert _streamed(merged) == (text, tokens, [None, "length"]) and text == "abcde" and len(tokens) == 5
    assert all(c["usage"] is None for c in merged)
    assert (
        lagging.usage_chunk(merge(increments[1:]))["usage"] == one_by_one.usage_chunk(increments[-1])["usage"]
    )
    if writer_class is translate.ChatWriter:
        assert [c["choices"][0]["delta"].get("role") for c in merged] == ["assistant", None]
