"""The low-rank rows kernel alone, against the same products compiled by torch.compile, in one run.

One decode step's adapter products at a model shape (default bench-1b: 4 layers x 7 projections, rank-16
LoRA on all of them, factors stacked as the engine stacks them, each layer its own stacks so that no layer
finds another's factors in cache), `--rows` rows spread over `--adapters` distinct adapters, and with
`--span N` a prefill chunk of N tokens of one of them before the rows, as a step that mixes them holds:

  kernel          low_rank_rows.add_rows: the C++ kernel, in place
  torch.compile   the same formula written in torch ops and compiled by torch.compile (inductor's C++ on
                  CPU, every size symbolic, every loop nest shared among the threads at run time), its
                  rows copied back with index_copy_: what the engine ran before the C++ kernel
  one adapter     the kernel with every row on one adapter (its factors stay in cache: the compute alone)

With `--prefill N` the step is instead `--spans` prefill spans of N tokens, each of its own adapter, and the
systems are where low_rank_compiled can send such spans (ROWS_SPAN_MAX sets where it does):

  rows            the kernel on every token (consecutive rows of one adapter run in blocks)
  GEMMs           the grouped kernel: one pair of matrix products per span and projection

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

from peftserve.adapters import AdapterBatch  # noqa: E402
from peftserve.adapters.forms import LowRankDelta  # noqa: E402
from peftserve.adapters.forms.low_rank import low_rank_grouped  # noqa: E402
from peftserve.adapters.forms.low_rank_rows import (  # noqa: E402
    ROWS_SPAN_MAX,
    RankStacks,
    RowsPlan,
    add_rows,
    bucket_rows,
)
from peftserve.bench.shapes import PROJECTIONS  # noqa: E402


def compiled_definition() -> Callable[..., torch.Tensor]:
    """The rows' products as torch ops, compiled the way the engine compiled them until 2026-11-29."""

    def products(y, x, rows, index, weight, a, bt):
        xr = x[rows].float()  # [n, in]
        h = (a[index].float() * xr[:, None, :]).sum(-1) * weight[:, None]  # [n, R]
        d = (h[:, :, None] * bt[index].float()).sum(1)  # [n, out]
        return (y[rows].float() + d).to(y.dtype)

    return torch.compile(products, dynamic=True, fullgraph=True, options={"cpp.dynamic_threads": True})


Layer = tuple[int, int, RankStacks, list[LowRankDelta]]
"""One projection of one layer: (in, out, its stacks, each slot's delta as views of them)."""
Step = Callable[[], None]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=51, help="distinct adapters among the rows")
    parser.add_argument("--span", type=int, default=0, help="tokens of one prefill chunk beside the rows")
    parser.add_argument("--prefill", type=int, default=0, help="tokens of each prefill span, instead of rows")
    parser.add_argument(
        "--spans", type=int, default=8, help="prefill spans (with --prefill), one adapter each"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.span > ROWS_SPAN_MAX:
        parser.error(f"--span runs as rows up to ROWS_SPAN_MAX = {ROWS_SPAN_MAX} tokens")
    shape, dtype = SHAPES[args.shape], getattr(torch, args.dtype)
    adapters = max(args.adapters, args.spans) if args.prefill else args.adapters
    gen = torch.Generator().manual_seed(0)
    layers: list[Layer] = []
    for _ in range(shape.layers):
        for name in PROJECTIONS:
            out, width = shape.projection_shape(name)
            stacks, deltas = RankStacks(max(adapters, args.rows)), []
            for slot in range(adapters):  # loaded as the engine loads a slot
                a = torch.randn(args.rank, width, generator=gen) / width**0.5
                b = torch.randn(out, args.rank, generator=gen) / args.rank
                deltas.append(LowRankDelta(a=a.to(dtype), b=b.to(dtype)))
                stacks.put(slot, deltas[-1])
            # the views once every delta is in: a bucket's growth moves its storage
            layers.append((width, out, stacks, [stacks.view(s, d) for s, d in enumerate(deltas)]))
    steps, what = (prefill_steps if args.prefill else decode_steps)(args, layers, dtype, gen)
    systems = list(steps)
    times: dict[str, list[float]] = {s: [] for s in systems}
    with torch.inference_mode():
        for system in systems:
            for _ in range(3):
                steps[system]()
        for _ in range(args.repeats):
            for system in systems:
                start = time.perf_counter()
                steps[system]()
                times[system].append(time.perf_counter() - start)
    print(
        f"{args.shape} {args.dtype}: {len(layers)} layers, {what}, rank-{args.rank} adapters, threads "
        f"{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; median of {args.repeats}"
    )
    medians = {s: statistics.median(t) for s, t in times.items()}
    first = systems[0]
    for system in systems:
        ms = 1e3 * medians[system]
        print(f"  {system:<14} {ms:7.2f} ms a step  {medians[system] / medians[first]:5.2f}x the {first}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: str(v) for k, v in vars(args).items()}, "load": os.getloadavg(), "ms": times}
        args.json_out.write_text(json.dumps(payload, indent=2) + "\n")


def decode_steps(
    args: argparse.Namespace, layers: list[Layer], dtype: torch.dtype, gen: torch.Generator
) -> tuple[dict[str, Step], str]:
    """A decode step's rows (and --span's chunk) on the kernel, on torch.compile, and on one adapter."""
    rng = random.Random(0)
    slots = sorted(
        [*range(args.adapters), *(rng.randrange(args.adapters) for _ in range(args.rows))][: args.rows]
    )
    span = [(0, args.span, ((slots[0], 1.0),))] if args.span else []  # a short prefill chunk, run as rows
    tokens = args.span + args.rows
    batches = {
        "kernel": AdapterBatch.build(
            [*span, *((args.span + t, 1, ((s, 1.0),)) for t, s in enumerate(slots))], tokens, "cpu"
        ),
        "one adapter": AdapterBatch.build([(t, 1, ((0, 1.0),)) for t in range(tokens)], tokens, "cpu"),
    }
    plans = {system: RowsPlan.of(batch) for system, batch in batches.items()}
    xs, ys = _activations(layers, tokens, dtype, gen)
    peer = compiled_definition()

    def compiled() -> None:
        for w, o, stacks, _ in layers:
            (part,) = bucket_rows(batches["kernel"], plans["kernel"], stacks)
            a, bt, y = stacks.stacks[part.bucket].a, stacks.stacks[part.bucket].bt, ys[o]
            y.index_copy_(0, part.rows, peer(y, xs[w], part.rows, part.index, part.weight, a, bt))

    def kernel(system: str) -> Step:
        def step() -> None:
            for w, o, stacks, _ in layers:  # the step's row lists are built once (the batch memoizes them)
                add_rows(ys[o], xs[w], bucket_rows(batches[system], plans[system], stacks), stacks)

        return step

    distinct = len(set(slots))
    factor_bytes = distinct * sum(args.rank * (w + o) for w, o, _, _ in layers) * dtype.itemsize
    chunk = f" and a span of {args.span} tokens of one of them" if args.span else ""
    what = f"{args.rows} rows over {distinct} adapters{chunk} ({factor_bytes / 1e6:.0f} MB of factors)"
    return {"kernel": kernel("kernel"), "torch.compile": compiled, "one adapter": kernel("one adapter")}, what


def prefill_steps(
    args: argparse.Namespace, layers: list[Layer], dtype: torch.dtype, gen: torch.Generator
) -> tuple[dict[str, Step], str]:
    """--spans prefill spans of --prefill tokens, one adapter each, as rows and as the grouped GEMMs."""
    length = args.prefill
    spans = [(i * length, length, ((i, 1.0),)) for i in range(args.spans)]
    tokens = length * args.spans
    batch = AdapterBatch.build(spans, tokens, "cpu")
    plan = RowsPlan([(i * length + t, i, 1.0) for i in range(args.spans) for t in range(length)], None)
    xs, ys = _activations(layers, tokens, dtype, gen)

    def rows() -> None:
        for w, o, stacks, _ in layers:
            add_rows(ys[o], xs[w], bucket_rows(batch, plan, stacks), stacks)

    def gemms() -> None:
        for w, o, _, views in layers:
            low_rank_grouped(ys[o], xs[w], batch, views)

    return {"rows": rows, "GEMMs": gemms}, f"{args.spans} spans of {length} tokens, one adapter each"


def _activations(
    layers: list[Layer], tokens: int, dtype: torch.dtype, gen: torch.Generator
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """Inputs by width and outputs by width, `tokens` rows each."""
    xs = {w: torch.randn(tokens, w, generator=gen).to(dtype) for w, _, _, _ in layers}
    ys = {o: torch.zeros(tokens, o, dtype=dtype) for _, o, _, _ in layers}
    return xs, ys


if __name__ == "__main__":
    main()
