"""Fair share between tenants: does one tenant flooding the server slow the others down?

Several "quiet" tenants send requests at a steady Poisson rate; one "flooding" tenant sends at
--flood-factor times a quiet tenant's rate. Each scenario replays the same seeded arrivals through
the real engine and its asyncio front (in process, so only scheduling differs between scenarios)
and measures each request's time to first token (TTFT):

  alone        the quiet tenants only                          (the baseline)
  flood-fcfs   with the flood, first come first served       (the old policy)
  flood-fair   with the flood, fair share (virtual token counters)
  flood-fair+limit  the same plus a per-tenant running limit (--tenant-max-running)

Target: the quiet tenants' TTFT p90 under the flood within 1.5x of their p90 alone. By default the
quiet tenants alone load the server to about a third of its throughput and the flood overloads it.

  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_fairness.py            # ~7 min, 2 cores
  PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_fairness.py --quick    # ~2 min
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import SHAPES, bench_tokenizer, build_model, environment, write_json
from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams


@dataclass(frozen=True)
class Arrival:
    at: float
    tenant: str
    prompt: list[int]
    max_new_tokens: int


@dataclass
class Scenario:
    name: str
    flood: bool
    scheduling: str
    tenant_max_running: int | None = None
    ttft: dict[str, list[float]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    load: float = 0.0
    """1-minute load average around the run (2.0 is both cores busy)."""


def make_arrivals(args: argparse.Namespace, flood: bool) -> list[Arrival]:
    """Seeded Poisson arrivals per tenant over --duration seconds; the flood uses its own seed."""
    arrivals = []
    tenants = [(f"quiet{i}", args.rate, 1 + i) for i in range(args.quiet_tenants)]
    if flood:
        tenants.append(("flood", args.rate * args.flood_factor, 1000))
    for tenant, rate, seed in tenants:
        rng = random.Random(args.seed * 7919 + seed)
        t = rng.expovariate(rate)
        while t < args.duration:
            prompt = [rng.randrange(4, 1000) for _ in range(rng.randint(*args.prompt_len))]
            arrivals.append(Arrival(t, tenant, prompt, rng.randint(*args.output_len)))
            t += rng.expovariate(rate)
    return sorted(arrivals, key=lambda a: a.at)


async def replay(front: AsyncEngine, arrivals: list[Arrival], scenario: Scenario) -> None:
    start = time.perf_counter()

    async def one(i: int, arrival: Arrival) -> None:
        await asyncio.sleep(max(0.0, arrival.at - (time.perf_counter() - start)))
        sent = time.perf_counter()
        request = GenerationRequest(
            request_id=f"{scenario.name}-{i}",
            prompt_token_ids=arrival.prompt,
            sampling=SamplingParams(max_new_tokens=arrival.max_new_tokens, ignore_eos=True),
            tenant=arrival.tenant,
        )
        first = None
        async for out in front.generate(request):
            if first is None and out.token_ids:
                first = time.perf_counter() - sent
            scenario.tokens += len(out.token_ids)
        scenario.ttft.setdefault(arrival.tenant, []).append(first)

    await asyncio.gather(*(one(i, a) for i, a in enumerate(arrivals)))
    scenario.seconds = time.perf_counter() - start


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def make_scenarios(args: argparse.Namespace) -> list[Scenario]:
    return [
        Scenario("alone", flood=False, scheduling="fair"),
        Scenario("flood-fcfs", flood=True, scheduling="fcfs"),
        Scenario("flood-fair", flood=True, scheduling="fair"),
        Scenario(
            "flood-fair+limit", flood=True, scheduling="fair", tenant_max_running=args.tenant_max_running
        ),
    ]


def play(args: argparse.Namespace, scenario: Scenario) -> None:
    model = build_model(SHAPES[args.shape], seed=args.seed)
    config = EngineConfig(
        warm_up="before",
        dtype="float32",
        kv_cache_mb=args.kv_cache_mb,
        max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens,
        scheduling=scenario.scheduling,
        tenant_max_running=scenario.tenant_max_running,
        max_queue=100_000,
    )
    engine = LLMEngine.from_model(model, bench_tokenizer(), config)
    engine.warmup()
    front = AsyncEngine(engine)
    load_before = os.getloadavg()[0]
    try:
        asyncio.run(replay(front, make_arrivals(args, scenario.flood), scenario))
    finally:
        front.shutdown()
    scenario.load = (load_before + os.getloadavg()[0]) / 2


def summary(s: Scenario, alone_p90: float) -> dict:
    quiet = [t for k, v in s.ttft.items() if k != "flood" for t in v]
    flood = s.ttft.get("flood", [])
    return {
        "scenario": s.name,
        "quiet_requests": len(quiet),
        "quiet_ttft_p50_s": p(quiet, 50),
        "quiet_ttft_p90_s": p(quiet, 90),
        "quiet_p90_vs_alone": p(quiet, 90) / alone_p90,
        "flood_requests": len(flood),
        "flood_ttft_p90_s": p(flood, 90) if flood else None,
        "tokens_per_s": s.tokens / s.seconds,
        "load_avg": s.load,
    }


def run(args: argparse.Namespace) -> dict:
    """Every scenario once per round, rounds in turn (a busy machine disturbs all alike); per round,
    the quiet tenants' p90 against that round's `alone`."""
    torch.set_num_threads(args.threads)
    rounds = []
    for r in range(args.repeats):
        scenarios = make_scenarios(args)
        for scenario in scenarios:
            play(args, scenario)
            print(f"round {r}, {scenario.name}: {scenario.tokens / scenario.seconds:.1f} tok/s", flush=True)
        alone_p90 = p([t for k, v in scenarios[0].ttft.items() if k != "flood" for t in v], 90)
        rounds.append([summary(s, alone_p90) for s in scenarios])
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    return {"environment": environment("cpu"), "args": settings, "rounds": rounds}


def table(rows: list[dict]) -> str:
    head = ("scenario", "quiet p50", "quiet p90", "p90 vs alone", "flood p90", "tok/s", "load avg")
    lines = [head]
    for r in rows:
        flood = f"{r['flood_ttft_p90_s']:.2f}s" if r["flood_ttft_p90_s"] is not None else "-"
        lines.append(
            (
                r["scenario"],
                f"{r['quiet_ttft_p50_s']:.3f}s",
                f"{r['quiet_ttft_p90_s']:.3f}s",
                f"{r['quiet_p90_vs_alone']:.2f}x",
                flood,
                f"{r['tokens_per_s']:.1f}",
                f"{r['load_avg']:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="shorter traces on the same shape")
    parser.add_argument("--shape", default="bench-mid", choices=sorted(SHAPES))
    parser.add_argument("--quiet-tenants", type=int, default=4)
    parser.add_argument("--rate", type=float, default=0.5, help="requests per second of each quiet tenant")
    parser.add_argument("--flood-factor", type=float, default=20.0)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(32, 128))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 64))
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--max-batched-tokens", type=int, default=128)
    parser.add_argument("--tenant-max-running", type=int, default=4)
    parser.add_argument("--kv-cache-mb", type=float, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="rounds of every scenario, in turn")
    parser.add_argument("--out", type=Path, default=Path("bench_out/fairness.json"))
    args = parser.parse_args()
    if args.quick:
        args.duration = 15.0
    result = run(args)
    write_json(args.out, result)
    for i, rows in enumerate(result["rounds"]):
        print(f"\nround {i}")
        print(table(rows))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
