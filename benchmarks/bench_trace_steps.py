"""The serving benchmark's main trace through one engine, in this process: adapters vs base, by step kind.

`peftserve bench` measures the trace through a server; this runs the same trace (64 requests at t=0,
prompts and outputs uniform in 8-256 tokens; with adapters, spread over 100 rank-16 LoRA adapters on all
7 projections with its power-law popularity) straight through `LLMEngine.step` until every request has
finished, so the time splits by what the step did:

  prefill     steps with a prompt chunk in them (decode rows may ride along)
  decode      steps of decode rows only, also split by how many rows were running

Each round serves the whole trace once with every request on its adapter, then once on the base model,
in one engine (its slots start empty, as a server's do; the prefix cache is off so that every round
computes every prompt). The systems take turns, and which goes first alternates by round (the first
to meet a step size pays for oneDNN's kernel for it); the best round of each system is reported, and
the ratios compare those. With --fresh-lengths every round draws a trace of its own (the same for
both systems), so its prompts have lengths the process has not seen, as in real traffic (a kernel built
per shape is then built again), and the report sums the rounds instead.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_trace_steps.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, bench_tokenizer, build_model  # noqa: E402
from profile_step import adapter_directories, add_trace  # noqa: E402

from peftserve.adapters.manager import AdapterManager  # noqa: E402
from peftserve.api.server import freeze_startup_heap  # noqa: E402
from peftserve.bench.config import WorkloadSpec  # noqa: E402
from peftserve.bench.workload import TraceRequest, make_trace  # noqa: E402
from peftserve.config import EngineConfig  # noqa: E402
from peftserve.engine.engine import LLMEngine  # noqa: E402


def serve_trace(engine: LLMEngine, trace: list[TraceRequest], ids: list[str], tag: str) -> dict[str, list]:
    """Step the engine until the trace is served; {kind: [steps, seconds]}."""
    add_trace(engine, trace, ids, tag=f"{tag}-")
    scheduler = engine.scheduler
    kinds: dict[str, list] = defaultdict(lambda: [0, 0.0])
    while scheduler.waiting or scheduler.running:
        prefill = bool(scheduler.waiting) or any(s.is_prefilling for s in scheduler.running)
        rows = len(scheduler.running)
        start = time.perf_counter()
        engine.step()
        seconds = time.perf_counter() - start
        names = (
            ["prefill"] if prefill else ["decode", f"decode, <= {1 << (max(rows, 1) - 1).bit_length()} rows"]
        )
        for name in ["total", *names]:
            kinds[name][0] += 1
            kinds[name][1] += seconds
    return dict(kinds)


def summed(runs: list[dict[str, list]]) -> dict[str, list]:
    """{kind: [steps, seconds]} over all the runs."""
    total: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for kinds in runs:
        for name, (n, seconds) in kinds.items():
            total[name][0] += n
            total[name][1] += seconds
    return dict(total)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--adapters", type=int, default=100)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--fresh-lengths", action="store_true", help="a new trace each round; sum the rounds")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    model = build_model(shape, "cpu", dtype, seed=0)
    tokenizer = bench_tokenizer()
    traces = [
        make_trace(
            WorkloadSpec(requests=args.requests, num_adapters=args.adapters, seed=seed),
            (3, min(len(tokenizer), shape.vocab)),
        )
        for seed in (range(args.rounds) if args.fresh_lengths else [0])
    ]
    config = EngineConfig(
        dtype=args.dtype, kv_cache_mb=2048, max_running=args.requests, prefix_cache="off", warm_up="before"
    )
    rounds: dict[str, list[dict[str, list]]] = {"adapters": [], "base": []}
    with tempfile.TemporaryDirectory(prefix="trace-steps-") as tmp:
        manager = AdapterManager(model, config.slots, "cpu", dtype)
        ids = []
        for adapter_id, path in adapter_directories(Path(tmp), args.adapters, shape):
            manager.register(adapter_id, path)
            ids.append(adapter_id)
        engine = LLMEngine.from_model(model, tokenizer, config, adapters=manager)
        engine.warmup()
        freeze_startup_heap()  # as the server does: a full collection would skip the model and modules
        for r in range(args.rounds):
            for system in list(rounds)[:: 1 if r % 2 == 0 else -1]:  # who goes first alternates
                trace = traces[r % len(traces)]
                kinds = serve_trace(engine, trace, ids if system == "adapters" else [], f"{system}{r}")
                rounds[system].append(kinds)
                print(f"round {r} {system}: {kinds['total'][1]:.1f} s", flush=True)
    if args.fresh_lengths:
        shown = {system: summed(runs) for system, runs in rounds.items()}
        kept = f"sum of {args.rounds} rounds, each its own trace"
    else:
        shown = {system: min(runs, key=lambda k: k["total"][1]) for system, runs in rounds.items()}
        kept = f"best of {args.rounds}"
    names = sorted(set(shown["adapters"]) | set(shown["base"]), key=lambda n: (n != "total", n))
    distinct = "/".join(str(len({r.adapter for r in trace})) for trace in traces)
    print(
        f"{args.shape} {args.dtype}, {args.requests} requests, {distinct} distinct adapters, threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; {kept}"
    )
    print(f"{'steps':<22} {'n':>4} {'adapters s':>11} {'base s':>8} {'ms/step':>15} {'ratio':>6}")
    for name in names:
        (n, a), (_, b) = shown["adapters"].get(name, [0, 0.0]), shown["base"].get(name, [0, 0.0])
        per = f"{1e3 * a / max(n, 1):.1f} / {1e3 * b / max(n, 1):.1f}"
        print(f"{name:<22} {n:>4} {a:>11.2f} {b:>8.2f} {per:>15} {a / b if b else float('nan'):>5.2f}x")
    if args.json_out:
        payload = {
            "args": {k: str(v) for k, v in vars(args).items()},
            "load": os.getloadavg(),
            "rounds": rounds,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
