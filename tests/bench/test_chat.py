"""The multi-turn chat trace: seeded, the prompts each turn resends, its translation to OpenAI requests."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from peftserve.bench import chat
from peftserve.bench.chat import ASSISTANT, USER, ChatSpec
from tests.helpers.fake_openai import FakeOpenAI, fake_reply

SMALL = ChatSpec(
    tenants=2, conversations=2, turns=3, system_len=40, user_len=(3, 6), reply_len=4, stagger_s=0.0
)


def test_same_spec_same_chats_and_tenants_share_their_system_prompt():
    chats = chat.make_chats(SMALL)
    assert chats == chat.make_chats(SMALL)
    assert chats != chat.make_chats(replace(SMALL, seed=1))
    assert [c.name for c in chats] == ["tenant0/0", "tenant0/1", "tenant1/0", "tenant1/1"]
    assert chats[0].system == chats[1].system != chats[2].system
    assert all(len(c.system) == 40 and len(c.users) == 3 for c in chats)
    assert all(3 <= len(u) <= 6 for c in chats for u in c.users)
    lo, hi = SMALL.id_range
    assert all(lo <= t < hi for c in chats for t in (*c.system, *sum(c.users, ())))


def test_each_turn_resends_the_history_with_the_replies_it_got():
    """What a system is sent: system prompt, then per turn markers, the user message, markers, its reply."""
    sent: list[tuple[str, int, list[int]]] = []

    async def send(c: chat.Chat, turn: int, prompt: list[int]) -> chat.Reply:
        sent.append((c.name, turn, prompt))
        return chat.Reply(0.01, [len(prompt)] * SMALL.reply_len)

    chats = chat.make_chats(SMALL)
    turns, seconds = asyncio.run(chat.play(send, chats, SMALL))

    assert len(turns) == len(sent) == 4 * 3 and seconds > 0
    c = chats[0]
    prompts = [p for name, _, p in sorted(sent) if name == c.name]
    expected = list(c.system)
    for k, user in enumerate(c.users):
        expected += [*USER, *user, *ASSISTANT]
        assert prompts[k] == expected
        expected += [len(expected)] * SMALL.reply_len
    assert [len(p) for p in prompts] == chat.prompt_lengths(c, SMALL.reply_len)
    assert (
        chat.longest_context(chats, SMALL.reply_len)
        == max(chat.prompt_lengths(x, SMALL.reply_len)[-1] for x in chats) + SMALL.reply_len
    )


def test_turn_stats_split_first_and_later_turns():
    turns = [
        chat.Turn("a/0", k, 100 + k, ttft_s=ttft, reply=[1, 2]) for k, ttft in enumerate([4.0, 1.0, 2.0])
    ]
    stats = chat.turn_stats(turns, seconds=2.0)
    assert (stats["requests"], stats["prompt_tokens"], stats["generated_tokens"]) == (3, 303, 6)
    assert stats["tokens_per_s"] == 3.0
    assert (stats["ttft_p50_s"], stats["ttft_p50_first_turns_s"], stats["ttft_p50_later_turns_s"]) == (
        2.0,
        4.0,
        1.5,
    )


def test_chats_reach_an_openai_server_as_token_id_completions_on_the_tenants_adapter(fake_peer):
    chats = chat.make_chats(SMALL)
    adapters = {"tenant0": "tenant0/chat", "tenant1": "tenant1/chat"}
    turns, _ = asyncio.run(chat.play_openai(fake_peer, chats, SMALL, adapters))

    assert len(FakeOpenAI.bodies) == len(turns) == 12
    for body in FakeOpenAI.bodies:
        assert body["max_tokens"] == SMALL.reply_len
        assert (body["temperature"], body["ignore_eos"], body["stream"], body["return_token_ids"]) == (
            0,
            True,
            True,
            True,
        )
    by_prompt = {tuple(b["prompt"]): b for b in FakeOpenAI.bodies}
    c = chats[3]  # tenant1's second chat
    history = list(c.system)
    for k, user in enumerate(c.users):
        history += [*USER, *user, *ASSISTANT]
        assert by_prompt[tuple(history)]["model"] == "tenant1/chat"
        reply = next(t.reply for t in turns if (t.chat, t.turn) == (c.name, k))
        assert reply == fake_reply(history, SMALL.reply_len)  # the ids the server sent back, in order
        history += reply


def test_a_server_without_token_ids_fails_loudly(fake_peer, monkeypatch):
    """A server that ignores return_token_ids (peftserve's HTTP API) cannot carry a chat's replies on."""
    real = chat.http_system.stream_completion

    async def without_ids(*args, **kwargs):
        return replace(await real(*args, **kwargs), token_ids=[])

    monkeypatch.setattr(chat.http_system, "stream_completion", without_ids)
    one = replace(SMALL, tenants=1, conversations=1, turns=1)
    with pytest.raises(RuntimeError, match="0 token ids back, asked for 4"):
        asyncio.run(chat.play_openai(fake_peer, chat.make_chats(one), one, {"tenant0": "a"}))


@pytest.mark.parametrize(
    "changes, message",
    [({"tenants": 0}, "tenants"), ({"reply_len": 0}, "reply_len"), ({"user_len": (5, 3)}, "user_len")],
)
def test_spec_rejects_empty_traces(changes, message):
    with pytest.raises(ValueError, match=message):
        replace(SMALL, **changes)
