"""Multi-turn chat with and without the prefix cache: time to first token and throughput.

Each tenant has a system prompt of --system-len tokens and its own LoRA adapter (rank 16 on all seven
projections); each of its --conversations chats runs --turns turns. A turn's prompt is the system
prompt, every earlier message and reply of the chat (with role-marker tokens between them, as a chat
template writes them) and a new user message of --user-len tokens; the reply is --reply-len greedy
tokens. Each chat sends its next turn --think-s after the reply ends, so all chats run at once and
the server is saturated. The same seeded trace runs through the real engine and its asyncio front (in
process) with ``prefix_cache="off"`` and then ``"on"``; the replies must be the same token for token.

Targets: TTFT p50 at least 5x lower with the cache, throughput (generated tokens per second over the
whole trace) at least 1.5x higher. On a shared machine, --rounds runs off and on in turn and reports
the ratios of each round (and their median), so load from others falls on both alike. The same trace
against vLLM's CPU build with its prefix caching is not yet run (benchmarks/README.md).

  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_prefix_cache.py            # ~6 min, 2 cores
  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_prefix_cache.py --quick    # ~30 s
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import SHAPES, bench_tokenizer, build_model, environment, write_json
from peftserve.adapters.manager import AdapterManager
from peftserve.bench.adapters import write_lora
from peftserve.bench.shapes import PROJECTIONS
from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams

USER, ASSISTANT = [5, 6], [7, 8]
"""Role-marker tokens before a user message and before a reply."""
TOKEN_IDS = (100, 30000)


@dataclass(frozen=True)
class Chat:
    tenant: str
    index: int
    system: list[int]
    users: list[list[int]]
    """The user message of each turn."""
    start_s: float


@dataclass
class Turn:
    chat: str
    turn: int
    prompt_tokens: int
    ttft_s: float = 0.0
    reply: list[int] = field(default_factory=list)


@dataclass
class Run:
    mode: str
    turns: list[Turn] = field(default_factory=list)
    seconds: float = 0.0
    cache: dict = field(default_factory=dict)


def make_chats(args: argparse.Namespace) -> list[Chat]:
    rng = random.Random(args.seed)
    chats = []
    for t in range(args.tenants):
        system = [rng.randrange(*TOKEN_IDS) for _ in range(args.system_len)]
        for c in range(args.conversations):
            users = [
                [rng.randrange(*TOKEN_IDS) for _ in range(rng.randint(*args.user_len))]
                for _ in range(args.turns)
            ]
            chats.append(Chat(f"tenant{t}", c, system, users, start_s=rng.uniform(0, args.stagger_s)))
    return chats


def build_engine(args: argparse.Namespace, adapter_dirs: dict[str, Path], prefix_cache: str) -> LLMEngine:
    shape = SHAPES[args.shape]
    model = build_model(shape, seed=args.seed)
    manager = AdapterManager(model, num_slots=max(8, len(adapter_dirs)), device="cpu", dtype=torch.float32)
    for adapter_id, directory in adapter_dirs.items():
        manager.register(adapter_id, directory)
    config = EngineConfig(
        kv_cache_mb=args.kv_cache_mb,
        max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens,
        max_context=8192,
        max_queue=100_000,
        prefix_cache=prefix_cache,
    )
    engine = LLMEngine.from_model(model, bench_tokenizer(), config, adapters=manager)
    engine.warmup()
    return engine


async def converse(front: AsyncEngine, chat: Chat, args: argparse.Namespace, run: Run, t0: float) -> None:
    await asyncio.sleep(max(0.0, chat.start_s - (time.perf_counter() - t0)))
    history = list(chat.system)
    for k, user in enumerate(chat.users):
        history += USER + user + ASSISTANT
        turn = Turn(f"{chat.tenant}/{chat.index}", k, len(history))
        request = GenerationRequest(
            request_id=f"{run.mode}-{chat.tenant}-{chat.index}-{k}",
            prompt_token_ids=list(history),
            sampling=SamplingParams(max_new_tokens=args.reply_len, ignore_eos=True),
            adapters=(AdapterRef(f"{chat.tenant}/chat"),),
            tenant=chat.tenant,
        )
        sent = time.perf_counter()
        async for out in front.generate(request):
            if not turn.reply and out.token_ids:
                turn.ttft_s = time.perf_counter() - sent
            turn.reply += out.token_ids
        run.turns.append(turn)
        history += turn.reply
        await asyncio.sleep(args.think_s)


def run_mode(args: argparse.Namespace, adapter_dirs: dict[str, Path], chats: list[Chat], mode: str) -> Run:
    engine = build_engine(args, adapter_dirs, prefix_cache=mode)
    run = Run(mode)
    front = AsyncEngine(engine)

    async def everything() -> None:
        t0 = time.perf_counter()
        await asyncio.gather(*(converse(front, chat, args, run, t0) for chat in chats))
        run.seconds = time.perf_counter() - t0

    try:
        asyncio.run(everything())
    finally:
        front.shutdown()
    stats = engine.prefix_cache_stats()
    run.cache = {
        "query_tokens": stats.query_tokens,
        "hit_tokens": stats.hit_tokens,
        "hit_rate": stats.hit_rate,
        "cached_blocks": stats.cached_blocks,
        "evictions": stats.evictions,
    }
    return run


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summary(run: Run) -> dict:
    ttft = [t.ttft_s for t in run.turns]
    first = [t.ttft_s for t in run.turns if t.turn == 0]
    later = [t.ttft_s for t in run.turns if t.turn > 0]
    generated = sum(len(t.reply) for t in run.turns)
    return {
        "mode": run.mode,
        "requests": len(run.turns),
        "prompt_tokens": sum(t.prompt_tokens for t in run.turns),
        "generated_tokens": generated,
        "seconds": run.seconds,
        "tokens_per_s": generated / run.seconds,
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p90_s": pct(ttft, 90),
        "ttft_p50_first_turns_s": pct(first, 50),
        "ttft_p90_first_turns_s": pct(first, 90),
        "ttft_p50_later_turns_s": pct(later, 50) if later else None,
        "ttft_p90_later_turns_s": pct(later, 90) if later else None,
        "prefix_cache": run.cache,
    }


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    chats = make_chats(args)
    with tempfile.TemporaryDirectory() as tmp:
        adapter_dirs = {}
        for t in range(args.tenants):
            directory = Path(tmp) / f"tenant{t}"
            write_lora(directory, shape, 16, PROJECTIONS, seed=args.seed * 1000 + t)
            adapter_dirs[f"tenant{t}/chat"] = directory
        rounds = []
        for i in range(args.rounds):  # off and on in turn, so load from others hits both alike
            pair = {}
            for mode in ("off", "on"):
                load = os.getloadavg()[0]
                pair[mode] = run_mode(args, adapter_dirs, chats, mode)
                print(
                    f"round {i + 1} prefix cache {mode}: {pair[mode].seconds:.1f} s (load {load:.1f})",
                    flush=True,
                )
            rounds.append(pair)
    rows = []
    for i, pair in enumerate(rounds):
        off, on = summary(pair["off"]), summary(pair["on"])
        replies = [{(t.chat, t.turn): t.reply for t in pair[m].turns} for m in ("off", "on")]
        rows.append(
            {
                "round": i + 1,
                "off": off,
                "on": on,
                "ttft_p50_ratio": off["ttft_p50_s"] / on["ttft_p50_s"],
                "throughput_ratio": on["tokens_per_s"] / off["tokens_per_s"],
                "replies_identical": replies[0] == replies[1],
            }
        )
    return {
        "environment": environment("cpu"),
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "rounds": rows,
        "ttft_p50_ratio_median": statistics.median(r["ttft_p50_ratio"] for r in rows),
        "throughput_ratio_median": statistics.median(r["throughput_ratio"] for r in rows),
    }


def table(result: dict) -> str:
    """One line per round and mode: TTFT p50/p90 of all turns, of first turns, of later turns; tok/s."""
    ttft_keys = ("ttft_p50_s", "ttft_p90_s", "ttft_p50_first_turns_s", "ttft_p90_first_turns_s",
                 "ttft_p50_later_turns_s", "ttft_p90_later_turns_s")  # fmt: skip
    head = ("round", "cache", "TTFT p50", "p90", "turn 1 p50", "p90", "turns 2+ p50", "p90", "tok/s",
            "hit rate", "seconds", "ratios")  # fmt: skip
    lines = [head]
    for row in result["rounds"]:
        for mode in ("off", "on"):
            r = row[mode]
            ratios = f"TTFT p50 {row['ttft_p50_ratio']:.1f}x, tok/s {row['throughput_ratio']:.2f}x"
            lines.append(
                (
                    str(row["round"]),
                    mode,
                    *(f"{r[k]:.3f}s" if r[k] is not None else "-" for k in ttft_keys),
                    f"{r['tokens_per_s']:.1f}",
                    f"{r['prefix_cache']['hit_rate']:.1%}",
                    f"{r['seconds']:.1f}",
                    ratios if mode == "on" else "",
                )
            )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )
    identical = all(r["replies_identical"] for r in result["rounds"])
    return (
        f"{text}\n\nmedian over rounds: TTFT p50 {result['ttft_p50_ratio_median']:.1f}x lower with the cache "
        f"(target >= 5x), throughput {result['throughput_ratio_median']:.2f}x (target >= 1.5x); "
        f"replies identical with and without the cache: {identical}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer tenants and turns")
    parser.add_argument("--shape", default="bench-mid", choices=sorted(SHAPES))
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=2, help="chats per tenant")
    parser.add_argument("--turns", type=int, default=4, help="turns per chat")
    parser.add_argument("--system-len", type=int, default=1000, help="tokens of each tenant's system prompt")
    parser.add_argument("--user-len", type=int, nargs=2, default=(20, 60), help="user message tokens LO HI")
    parser.add_argument("--reply-len", type=int, default=32, help="generated tokens per turn")
    parser.add_argument("--think-s", type=float, default=0.0, help="pause between a reply and the next turn")
    parser.add_argument("--stagger-s", type=float, default=1.0, help="chats start uniformly within this")
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--max-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-mb", type=float, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3, help="off then on, this many times")
    parser.add_argument("--out", type=Path, default=Path("bench_out/prefix_cache.json"))
    args = parser.parse_args()
    if args.quick:
        args.tenants, args.turns, args.rounds = 2, 3, 1
    result = run(args)
    write_json(args.out, result)
    print(table(result))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
