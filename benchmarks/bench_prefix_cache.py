"""Multi-turn chat with and without the prefix cache: time to first token and throughput.

Each tenant has a system prompt of --system-len tokens and its own LoRA adapter (rank 16 on all seven
projections); each of its --conversations chats runs --turns turns (the trace: `peftserve.bench.chat`).
Each chat sends its next turn --think-s after the reply ends, so all chats run at once and the server
is saturated. The same seeded trace runs through the real engine and its asyncio front (in process)
with ``prefix_cache="off"`` and then ``"on"``; the replies must be the same token for token.

Targets: TTFT p50 at least 5x lower with the cache, throughput (generated tokens per second over the
whole trace) at least 1.5x higher. On a shared machine, --rounds runs off and on in turn and reports
the ratios of each round (and their median), so load from others falls on both alike.

`--systems peftserve vllm` adds vLLM's CPU build (`make peer-vllm`) as a peer on the same trace: its
OpenAI server on the same model (saved with its tokenizer), each tenant's LoRA as a LoRA module, its
prefix caching off and then on, fp32, the same step token budget, running requests and threads; each
chat resends the token ids vLLM generated for it.

  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_prefix_cache.py            # ~6 min, 2 cores
  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_prefix_cache.py --quick    # ~30 s
  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_prefix_cache.py --systems peftserve vllm \
      --rounds 1    # ~8 min, 2 cores (--quick: ~3 min)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import (
    SHAPES,
    add_vllm_arguments,
    bench_tokenizer,
    build_model,
    environment,
    write_json,
)
from peftserve.adapters.manager import AdapterManager
from peftserve.bench import chat, http_system
from peftserve.bench.adapters import write_lora
from peftserve.bench.shapes import PROJECTIONS
from peftserve.bench.vllm_system import VllmServer, VllmSpec
from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from peftserve.model.tokenizer import save_tokenizer

SYSTEMS = ("peftserve", "vllm")
"""vllm is opt-in: it needs the peer virtualenv."""
MODES = ("off", "on")
LORA_RANK = 16


@dataclass
class Run:
    system: str
    mode: str
    turns: list[chat.Turn] = field(default_factory=list)
    seconds: float = 0.0
    cache: dict = field(default_factory=dict)
    """The prefix cache's counters over the trace: query and hit tokens, hit rate (peftserve: also blocks,
    evictions)."""


@dataclass(frozen=True)
class Setup:
    """What every run of one invocation shares: the trace, the saved model and the tenants' adapters."""

    spec: chat.ChatSpec
    chats: list[chat.Chat]
    model_dir: Path
    adapter_dirs: dict[str, Path]
    """Adapter id -> PEFT directory."""
    adapter_of: dict[str, str]
    """Tenant -> adapter id."""
    log_dir: Path


def chat_spec(args: argparse.Namespace) -> chat.ChatSpec:
    return chat.ChatSpec(
        tenants=args.tenants,
        conversations=args.conversations,
        turns=args.turns,
        system_len=args.system_len,
        user_len=tuple(args.user_len),
        reply_len=args.reply_len,
        stagger_s=args.stagger_s,
        think_s=args.think_s,
        seed=args.seed,
    )


def build_engine(args: argparse.Namespace, adapter_dirs: Mapping[str, Path], prefix_cache: str) -> LLMEngine:
    shape = SHAPES[args.shape]
    model = build_model(shape, seed=args.seed)
    manager = AdapterManager(model, num_slots=max(8, len(adapter_dirs)), device="cpu", dtype=torch.float32)
    for adapter_id, directory in adapter_dirs.items():
        manager.register(adapter_id, directory)
    config = EngineConfig(
        warm_up="before",
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


def engine_sender(front: AsyncEngine, setup: Setup, mode: str) -> chat.TurnSender:
    """Turns as requests to the in-process engine, under the tenant's adapter and as the tenant."""

    async def send(c: chat.Chat, turn: int, prompt: list[int]) -> chat.Reply:
        request = GenerationRequest(
            request_id=f"{mode}-{c.tenant}-{c.index}-{turn}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_new_tokens=setup.spec.reply_len, ignore_eos=True),
            adapters=(AdapterRef(setup.adapter_of[c.tenant]),),
            tenant=c.tenant,
        )
        sent, ttft, reply = time.perf_counter(), 0.0, []
        async for out in front.generate(request):
            if not reply and out.token_ids:
                ttft = time.perf_counter() - sent
            reply += out.token_ids
        return chat.Reply(ttft, reply)

    return send


def run_peftserve(args: argparse.Namespace, setup: Setup, mode: str) -> Run:
    engine = build_engine(args, setup.adapter_dirs, prefix_cache=mode)
    front = AsyncEngine(engine)
    try:
        turns, seconds = asyncio.run(chat.play(engine_sender(front, setup, mode), setup.chats, setup.spec))
    finally:
        front.shutdown()
    stats = engine.prefix_cache_stats()
    cache = {
        "query_tokens": stats.query_tokens,
        "hit_tokens": stats.hit_tokens,
        "hit_rate": stats.hit_rate,
        "cached_blocks": stats.cached_blocks,
        "evictions": stats.evictions,
    }
    return Run("peftserve", mode, turns, seconds, cache)


def vllm_spec(args: argparse.Namespace, setup: Setup, mode: str) -> VllmSpec:
    """vLLM on the same model and adapters, with the engine's budgets: fp32, the step token budget, running
    requests, KV cache (at least vLLM's 1 GiB), threads; prefix caching as the mode says."""
    return VllmSpec(
        python=Path(args.vllm_python),
        model_dir=setup.model_dir,
        dtype="float32",
        adapters=tuple(setup.adapter_dirs.items()),
        max_lora_rank=LORA_RANK,
        max_loras=len(setup.adapter_dirs),
        max_num_seqs=args.max_running,
        max_model_len=chat.longest_context(setup.chats, setup.spec.reply_len) + 16,
        max_num_batched_tokens=args.max_batched_tokens,
        prefix_caching=mode == "on",
        block_size=args.vllm_block_size,
        kv_cache_gib=args.kv_cache_mb / 1024,
        threads=args.vllm_threads or args.threads,
        preload=tuple(map(Path, args.vllm_preload)),
    )


def run_vllm(args: argparse.Namespace, setup: Setup, mode: str) -> Run:
    """The trace on a vLLM server started for this mode (prefix caching is a start-up flag)."""
    with VllmServer(vllm_spec(args, setup, mode), setup.log_dir / f"vllm-{mode}.log") as server:
        url = server.wait_ready(args.vllm_timeout_s)
        http_system.warm_up(url, list(setup.adapter_dirs))  # every LoRA loaded before the clock starts
        queried0, found0 = server.prefix_cache_tokens()
        turns, seconds = asyncio.run(chat.play_openai(url, setup.chats, setup.spec, setup.adapter_of))
        queried, found = server.prefix_cache_tokens()
    queried, found = queried - queried0, found - found0
    cache = {"query_tokens": queried, "hit_tokens": found, "hit_rate": found / queried if queried else 0.0}
    return Run("vllm", mode, turns, seconds, cache)


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    """The trace; each tenant's LoRA in PEFT format; the model saved with its tokenizer (for vLLM)."""
    shape = SHAPES[args.shape]
    spec = chat_spec(args)
    adapter_dirs, adapter_of = {}, {}
    for t in range(spec.tenants):
        directory = work / f"tenant{t}"
        write_lora(directory, shape, LORA_RANK, PROJECTIONS, seed=args.seed * 1000 + t)
        adapter_dirs[f"tenant{t}/chat"] = directory
        adapter_of[f"tenant{t}"] = f"tenant{t}/chat"
    model_dir = work / "model"
    if "vllm" in args.systems:
        build_model(shape, seed=args.seed).save_pretrained(model_dir)
        save_tokenizer(bench_tokenizer(), model_dir)
    log_dir = args.out.parent
    return Setup(spec, chat.make_chats(spec), model_dir, adapter_dirs, adapter_of, log_dir)


def summary(run: Run) -> dict:
    return {"mode": run.mode, **chat.turn_stats(run.turns, run.seconds), "prefix_cache": run.cache}


def compare(pair: Mapping[str, Run]) -> dict:
    """One system's off and on runs of a round, with the ratios of on to off."""
    off, on = summary(pair["off"]), summary(pair["on"])
    return {
        "off": off,
        "on": on,
        "ttft_p50_ratio": off["ttft_p50_s"] / on["ttft_p50_s"],
        "throughput_ratio": on["tokens_per_s"] / off["tokens_per_s"],
        "replies_identical": chat.replies(pair["off"].turns) == chat.replies(pair["on"].turns),
    }


def same_turns(a: Run, b: Run) -> float:
    """Share of turns whose reply is the same in both runs."""
    ra, rb = chat.replies(a.turns), chat.replies(b.turns)
    return sum(ra[k] == rb.get(k) for k in ra) / len(ra)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    runners = {"peftserve": run_peftserve, "vllm": run_vllm}
    with tempfile.TemporaryDirectory(prefix="bench-prefix-cache-") as tmp:
        setup = prepare(args, Path(tmp))
        rounds = []
        for i in range(args.rounds):  # off and on in turn, so load from others hits both alike
            runs = {}
            for system in args.systems:
                for mode in MODES:
                    load = os.getloadavg()
                    runs[system, mode] = runners[system](args, setup, mode)
                    print(
                        f"round {i + 1} {system} prefix cache {mode}: {runs[system, mode].seconds:.1f} s "
                        f"(load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})",
                        flush=True,
                    )
            row = {
                "round": i + 1,
                "systems": {s: compare({m: runs[s, m] for m in MODES}) for s in args.systems},
            }
            if set(SYSTEMS) <= set(args.systems):  # each follows its own replies; how often they agree
                row["vllm_replies_equal_peftserve"] = same_turns(
                    runs["peftserve", "off"], runs["vllm", "off"]
                )
            rounds.append(row)
    medians = {
        s: {
            key: statistics.median(r["systems"][s][key] for r in rounds)
            for key in ("ttft_p50_ratio", "throughput_ratio")
        }
        for s in args.systems
    }
    return {
        "environment": environment("cpu"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "rounds": rounds,
        "medians": medians,
    }


def table(result: dict) -> str:
    """A line per round, system and mode: TTFT p50/p90 of all turns, first turns, later turns; tok/s."""
    ttft_keys = ("ttft_p50_s", "ttft_p90_s", "ttft_p50_first_turns_s", "ttft_p90_first_turns_s",
                 "ttft_p50_later_turns_s", "ttft_p90_later_turns_s")  # fmt: skip
    head = ("round", "system", "cache", "TTFT p50", "p90", "turn 1 p50", "p90", "turns 2+ p50", "p90",
            "tok/s", "hit rate", "seconds", "ratios")  # fmt: skip
    lines = [head]
    for row in result["rounds"]:
        for system, pair in row["systems"].items():
            for mode in MODES:
                r = pair[mode]
                ratios = f"TTFT p50 {pair['ttft_p50_ratio']:.1f}x, tok/s {pair['throughput_ratio']:.2f}x"
                lines.append(
                    (
                        str(row["round"]),
                        system,
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
    notes = []
    for system, median in result["medians"].items():
        identical = all(r["systems"][system]["replies_identical"] for r in result["rounds"])
        notes.append(
            f"{system}, median over rounds: TTFT p50 {median['ttft_p50_ratio']:.1f}x lower with the cache "
            f"(target >= 5x), throughput {median['throughput_ratio']:.2f}x (target >= 1.5x); "
            f"replies identical with and without the cache: {identical}"
        )
    for r in result["rounds"]:
        if "vllm_replies_equal_peftserve" in r:
            share = r["vllm_replies_equal_peftserve"]
            notes.append(
                f"round {r['round']}: vLLM's replies equal peftserve's in {share:.0%} of turns (cache off)"
            )
    return text + "\n\n" + "\n".join(notes)


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
    parser.add_argument("--systems", nargs="+", default=["peftserve"], choices=SYSTEMS)
    add_vllm_arguments(parser, threads_default="--threads")
    parser.add_argument(
        "--vllm-block-size", type=int, default=None, help="vLLM's KV block (default: its own, 128)"
    )
    parser.add_argument("--vllm-timeout-s", type=float, default=900.0, help="how long vLLM may take to start")
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
