"""A multi-turn chat trace: tenants with long system prompts, chats that resend their history every turn.

Each tenant has a system prompt and its own adapter; each of its chats runs a number of turns. A turn's
prompt is the system prompt, every earlier message and reply of the chat (role-marker tokens before
each, as a chat template writes them) and a new user message; the reply is a fixed number of greedy
tokens, EOS ignored, so every system sends prompts of the same lengths. A chat sends its next turn as
soon as its reply ends (plus think_s), with its own replies in the history, so a system's prefix cache
finds what it generated itself.

Plain Python (no torch): `play` drives any system through a `TurnSender`, the in-process engine or an
OpenAI-compatible server alike.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from peftserve.bench import http_system
from peftserve.bench.records import percentile

if TYPE_CHECKING:
    import openai

USER, ASSISTANT = (5, 6), (7, 8)
"""Role-marker tokens before a user message and before a reply."""


@dataclass(frozen=True)
class ChatSpec:
    """The shape of the trace; the same spec and seed give the same system prompts and messages."""

    tenants: int = 8
    """Tenants, each with its own system prompt and adapter."""
    conversations: int = 2
    """Chats per tenant."""
    turns: int = 4
    """Turns per chat."""
    system_len: int = 1000
    """Tokens of each tenant's system prompt."""
    user_len: tuple[int, int] = (20, 60)
    """Tokens of a user message, uniform in [lo, hi]."""
    reply_len: int = 32
    """Tokens generated per turn."""
    stagger_s: float = 1.0
    """Chats start uniformly within this many seconds."""
    think_s: float = 0.0
    """Pause between a reply and the chat's next turn."""
    id_range: tuple[int, int] = (100, 30000)
    """Token ids of system prompts and messages, [lo, hi)."""
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"tenants": self.tenants, "conversations": self.conversations, "turns": self.turns}
        positive |= {"system_len": self.system_len, "reply_len": self.reply_len}
        for name, value in positive.items():
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        lo, hi = self.user_len
        if not 0 < lo <= hi:
            raise ValueError(f"user_len must be 0 < lo <= hi, got {self.user_len}")


@dataclass(frozen=True)
class Chat:
    tenant: str
    index: int
    system: tuple[int, ...]
    users: tuple[tuple[int, ...], ...]
    """The user message of each turn."""
    start_s: float

    @property
    def name(self) -> str:
        return f"{self.tenant}/{self.index}"


@dataclass
class Turn:
    """One turn as a system served it."""

    chat: str
    turn: int
    prompt_tokens: int
    ttft_s: float = 0.0
    """From sending the turn to its first token."""
    reply: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Reply:
    ttft_s: float
    token_ids: list[int]


class TurnSender(Protocol):
    """Serves one turn: the chat's prompt under its tenant's adapter, reply_len greedy tokens."""

    async def __call__(self, chat: Chat, turn: int, prompt: list[int]) -> Reply: ...


def make_chats(spec: ChatSpec) -> list[Chat]:
    """Every tenant's chats; the draws keep their order, so a spec always gives the same trace."""
    rng = random.Random(spec.seed)
    chats = []
    for t in range(spec.tenants):
        system = tuple(rng.randrange(*spec.id_range) for _ in range(spec.system_len))
        for c in range(spec.conversations):
            users = tuple(
                tuple(rng.randrange(*spec.id_range) for _ in range(rng.randint(*spec.user_len)))
                for _ in range(spec.turns)
            )
            chats.append(Chat(f"tenant{t}", c, system, users, start_s=rng.uniform(0, spec.stagger_s)))
    return chats


def prompt_lengths(chat: Chat, reply_len: int) -> list[int]:
    """The prompt length of each turn (replies have reply_len tokens)."""
    lengths, total = [], len(chat.system)
    for k, user in enumerate(chat.users):
        total += (reply_len if k else 0) + len(USER) + len(user) + len(ASSISTANT)
        lengths.append(total)
    return lengths


def longest_context(chats: Sequence[Chat], reply_len: int) -> int:
    """The most tokens any turn holds: its prompt and its reply."""
    return max(prompt_lengths(chat, reply_len)[-1] for chat in chats) + reply_len


async def converse(send: TurnSender, chat: Chat, spec: ChatSpec, t0: float) -> list[Turn]:
    """One chat from its start time to its last reply."""
    await asyncio.sleep(max(0.0, chat.start_s - (time.perf_counter() - t0)))
    history, turns = list(chat.system), []
    for k, user in enumerate(chat.users):
        history += [*USER, *user, *ASSISTANT]
        reply = await send(chat, k, list(history))
        turns.append(Turn(chat.name, k, len(history), reply.ttft_s, list(reply.token_ids)))
        history += reply.token_ids
        await asyncio.sleep(spec.think_s)
    return turns


async def play(send: TurnSender, chats: Sequence[Chat], spec: ChatSpec) -> tuple[list[Turn], float]:
    """All chats at once; every turn served and the seconds from the start to the last reply."""
    t0 = time.perf_counter()
    per_chat = await asyncio.gather(*(converse(send, chat, spec, t0) for chat in chats))
    return [turn for turns in per_chat for turn in turns], time.perf_counter() - t0


def openai_sender(client: openai.AsyncOpenAI, adapters: Mapping[str, str], reply_len: int) -> TurnSender:
    """Turns as streamed completions on token ids, `model` naming the tenant's adapter (adapters[tenant]);
    the reply's ids come back in vLLM's `return_token_ids` field, so the next turn resends them as they
    are (text would not round-trip through the tokenizer)."""

    async def send(chat: Chat, turn: int, prompt: list[int]) -> Reply:
        sent = time.perf_counter()
        out = await http_system.stream_completion(
            client, adapters[chat.tenant], prompt, reply_len, return_token_ids=True
        )
        if out.first_token_at is None or len(out.token_ids) != reply_len:
            raise RuntimeError(
                f"{chat.name} turn {turn}: {len(out.token_ids)} token ids back, asked for {reply_len}"
            )
        return Reply(out.first_token_at - sent, out.token_ids)

    return send


async def play_openai(
    base_url: str, chats: Sequence[Chat], spec: ChatSpec, adapters: Mapping[str, str]
) -> tuple[list[Turn], float]:
    """`play` against the OpenAI-compatible server at base_url (http://host:port)."""
    import openai

    async with openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="bench", max_retries=0) as client:
        return await play(openai_sender(client, adapters, spec.reply_len), chats, spec)


def turn_stats(turns: Sequence[Turn], seconds: float) -> dict[str, float | int | None]:
    """TTFT percentiles of all turns, of first turns and of later ones; tokens and throughput."""
    ttft = [t.ttft_s for t in turns]
    first = [t.ttft_s for t in turns if t.turn == 0]
    later = [t.ttft_s for t in turns if t.turn > 0]
    generated = sum(len(t.reply) for t in turns)
    return {
        "requests": len(turns),
        "prompt_tokens": sum(t.prompt_tokens for t in turns),
        "generated_tokens": generated,
        "seconds": seconds,
        "tokens_per_s": generated / seconds,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p50_first_turns_s": percentile(first, 50),
        "ttft_p90_first_turns_s": percentile(first, 90),
        "ttft_p50_later_turns_s": percentile(later, 50),
        "ttft_p90_later_turns_s": percentile(later, 90),
    }


def replies(turns: Sequence[Turn]) -> dict[tuple[str, int], list[int]]:
    """Each turn's reply by (chat, turn), to compare two runs token for token."""
    return {(t.chat, t.turn): t.reply for t in turns}
