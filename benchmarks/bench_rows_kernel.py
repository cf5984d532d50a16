"""The low-rank rows kernel alone, against the same products compiled by torch.compile, in one run.

One decode step's adapter products at a model shape (default bench-1b: 4 layers x 7 projections, rank-16
LoRA on all of them, factors stacked as the engine stacks them, each layer its own stacks so that no layer
finds another's factors in cache), `--rows` rows spread over `--adapters` distinct adapters:

  kernel          low_rank_rows.add_rows: the C++ kernel, in place
  torch.compile   the same formula written in torch ops and compiled by torch.compile (inductor's C++ on
                  CPU, every size symbolic, every loop nest shared among the threads at run time), its
                  rows copied back with index_copy_: what the engine ran before the C++ kernel
  one adapter     the kernel with every row on one adapter (its factors stay in cache: the compute alone)

Each system runs `--repeats` steps after a warm-up, interleaved; the median step is reported.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_rows_kernel.py --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES  # noqa: E402

from peftserve.adapters.forms import low_rank_rows  # noqa: E402
from peftserve.adapters.forms.low_rank_rows import RankStacks, _BucketRows  # noqa: E402
from peftserve.bench.shapes import PROJECTIONS  # noqa: E402


def compiled_definition() -> Callable[..., torch.Tensor]:
    """The rows' products as torch ops, compiled the way the engine compiled them until 2026-11-29."""

    def products(y, x, rows, index, weight, a, bt):
        xr = x[rows].float()  # [n, in]
        h = (a[index].float() * xr[:, None, :]).sum(-1) * weight[:, None]  # [n, R]
        d = (h[:, :, None] * bt[index].float()).sum(1)  # [n, out]
        return (y[rows].float() + d).to(y.dtype)

    return torch.compile(products, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=51, help="distinct adapters among the rows")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    capacity = max(args.adapters, args.rows)
    layers = []  # per layer and projection: (in, out, a, bt)
    for _ in range(shape.layers):
        for name in PROJECTIONS:
            out, width = shape.projection_shape(name)
            a = (torch.randn(capacity, args.rank, width, generator=gen) / width**0.5).to(dtype)
            bt = (torch.randn(capacity, args.rank, out, generator=gen) / args.rank).to(dtype)
            layers.append((width, out, a, bt))
    rng = random.Random(0)
    index = sorted(
        [*range(args.adapters), *(rng.randrange(args.adapters) for _ in range(args.rows))][: args.rows]
    )
    rows = torch.arange(args.rows)
    weight = torch.ones(args.rows)
    xs = {w: torch.randn(args.rows, w, generator=gen).to(dtype) for w, _, _, _ in layers}
    ys = {o: torch.zeros(args.rows, o, dtype=dtype) for _, o, _, _ in layers}

    def stacks_of(a: torch.Tensor, bt: torch.Tensor) -> RankStacks:
        stacks = RankStacks(capacity)
        stacks.stacks[args.rank] = low_rank_rows._Stack(a, bt, list(range(capacity)), [args.rank] * capacity)
        return stacks

    held = [(w, o, stacks_of(a, bt)) for w, o, a, bt in layers]
    parts = {
        "kernel": [_BucketRows(args.rank, rows, torch.tensor(index), weight)],
        "one adapter": [_BucketRows(args.rank, rows, torch.zeros(args.rows, dtype=torch.long), weight)],
    }
    peer = compiled_definition()

    def step(system: str) -> None:
        if system == "torch.compile":
            for w, o, a, bt in layers:
                y = ys[o]
                y.index_copy_(0, rows, peer(y, xs[w], rows, parts["kernel"][0].index, weight, a, bt))
            return
        for w, o, stacks in held:
            low_rank_rows.add_rows(ys[o], xs[w], parts[system], stacks)

    systems = ["kernel", "torch.compile", "one adapter"]
    times: dict[str, list[float]] = {s: [] for s in systems}
    with torch.inference_mode():
        for system in systems:
            for _ in range(3):
                step(system)
        for _ in range(args.repeats):
            for system in systems:
                start = time.perf_counter()
                step(system)
                times[system].append(time.perf_counter() - start)
    distinct = len(set(index))
    factor_bytes = sum(args.rank * (w + o) for w, o, _, _ in layers) * torch.finfo(dtype).bits // 8
    print(
        f"{args.shape} {args.dtype}: {len(layers)} layers, {args.rows} rows over {distinct} "
        f"rank-{args.rank} adapters ({distinct * factor_bytes / 1e6:.0f} MB of factors), threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; median of {args.repeats}"
    )
    medians = {s: statistics.median(t) for s, t in times.items()}
    for system in systems:
        ms = 1e3 * medians[system]
        print(f"  {system:<14} {ms:7.2f} ms a step  {medians[system] / medians['kernel']:5.2f}x the kernel")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "load": os.getloadavg(), "ms": times}
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
