"""Adapter store and memory tiers: cold-load latency and throughput with many registered adapters.

1. Cold load, disk -> device: rank-16 LoRA on all 7 projections of the `bench-1b` shape (about 9.3 MB of
   fp32 per adapter), uploaded through the AdapterAdmin into a fresh store, dropped from memory, then
   loaded one at a time: disk -> host (read, sha256 against the manifest, header check, parse, normalize,
   check against the base) and host -> device (into a slot). p50 / p99 over --cold-adapters adapters.
   The files were just written, so they are read from the OS page cache; a cold disk adds its I/O time.
2. Throughput under power-law popularity, 10 versus 1,000 registered adapters, same run and engine:
   --requests requests (all submitted at once through AsyncEngine), each naming adapter i of the N with
   probability proportional to 1 / (i + 1) ** s. Every run starts with the adapters on disk only; the
   tok/s include every cold load and eviction. Runs are interleaved and repeated; the best is reported.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_store.py
    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_store.py --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, bench_tokenizer, build_model, environment, make_prompts, synchronize, write_json  # noqa: E402

from peftserve.adapters import AdapterAdminService, AdapterManager  # noqa: E402
from peftserve.config import EngineConfig  # noqa: E402
from peftserve.engine.async_engine import AsyncEngine  # noqa: E402
from peftserve.engine.engine import LLMEngine  # noqa: E402
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams  # noqa: E402
from peftserve.store import AdapterStore  # noqa: E402

ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TENANT = "bench"


def projection_shapes(model: nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Module path -> (out, in) of every targeted Linear (read before the manager wraps them)."""
    return {
        path: (m.out_features, m.in_features)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in targets
    }


def lora_files(
    shapes: dict[str, tuple[int, int]], rank: int, seed: int, dtype: torch.dtype
) -> dict[str, bytes]:
    """A PEFT LoRA upload (adapter_config.json, adapter_model.safetensors) with seeded random weights."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for path, (out_features, in_features) in shapes.items():
        prefix = f"base_model.model.{path}"
        tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=gen) * 0.01).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=gen) * 0.01).to(dtype)
    targets = sorted({p.rsplit(".", 1)[-1] for p in shapes})
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": targets,
        "bias": "none",
    }
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save(tensors)}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def inline(fn):
    return fn()


# -- 1. cold load ---------------------------------------------------------------------------------


@dataclass
class ColdLoad:
    adapters: int
    adapter_mb: float
    disk_to_host_ms: list[float]
    host_to_device_ms: list[float]

    @property
    def total_ms(self) -> list[float]:
        return [a + b for a, b in zip(self.disk_to_host_ms, self.host_to_device_ms, strict=True)]


def bench_cold_load(args: argparse.Namespace, root: Path) -> ColdLoad:
    shape = SHAPES["bench-1b"]
    dtype = getattr(torch, args.dtype)
    model = build_model(shape, args.device, dtype)
    shapes = projection_shapes(model, ALL_PROJECTIONS)
    manager = AdapterManager(model, num_slots=4, device=args.device, dtype=dtype)
    admin = AdapterAdminService(manager, AdapterStore(root / "cold"), inline)
    ids = [f"{TENANT}/cold{i}" for i in range(args.cold_adapters)]
    size = 0
    for i, adapter_id in enumerate(ids):
        files = lora_files(shapes, 16, seed=i, dtype=torch.float32)
        size = len(files["adapter_model.safetensors"])
        asyncio.run(admin.upload(TENANT, adapter_id.split("/")[1], files))
        manager.unload(adapter_id)  # the upload left it in host memory: start from disk
    manager.apply_drops()
    to_host, to_device = [], []
    for adapter_id in ids:
        key = manager.hold_current(adapter_id)
        start = time.perf_counter()
        manager.ensure_host([key])[0].result()
        loaded = time.perf_counter()
        manager.load_to_device(key, pin=False)
        synchronize(args.device)
        done = time.perf_counter()
        manager.release_holds([key])
        manager.unload(adapter_id)
        manager.apply_drops()
        to_host.append((loaded - start) * 1e3)
        to_device.append((done - loaded) * 1e3)
    manager.close()
    return ColdLoad(len(ids), size / 2**20, to_host, to_device)


def cold_table(result: ColdLoad, args: argparse.Namespace) -> str:
    rows = [("phase", "p50 ms", "p99 ms", "mean ms")]
    for name, values in (
        ("disk -> host", result.disk_to_host_ms),
        ("host -> device", result.host_to_device_ms),
        ("disk -> device", result.total_ms),
    ):
        mean = sum(values) / len(values)
        rows.append((name, f"{percentile(values, 50):.1f}", f"{percentile(values, 99):.1f}", f"{mean:.1f}"))
    title = (
        f"Cold load, bench-1b, rank-16 LoRA on all 7 projections ({result.adapter_mb:.1f} MB per adapter),"
        f" {args.device} {args.dtype}, {result.adapters} adapters"
    )
    return title + "\n" + format_rows(rows)


# -- 2. throughput --------------------------------------------------------------------------------


@dataclass
class Run:
    registered: int
    distinct: int
    seconds: float
    tokens: int
    host_loads: int
    device_loads: int
    host_evictions: int
    device_evictions: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def bench_throughput(args: argparse.Namespace, root: Path) -> list[Run]:
    shape = SHAPES[args.shape]
    dtype = getattr(torch, args.dtype)
    model = build_model(shape, args.device, dtype)
    shapes = projection_shapes(model, tuple(args.targets))
    manager = AdapterManager(
        model, args.slots, args.device, dtype, host_cache_bytes=int(args.host_cache_mb * 2**20)
    )
    store = AdapterStore(root / "many", max_adapters_per_tenant=max(args.counts))
    config = EngineConfig(
        kv_cache_mb=args.kv_cache_mb,
        max_running=args.max_running,
        max_batched_tokens=args.max_batched_tokens,
        warm_up="before",
    )
    front = AsyncEngine(LLMEngine.from_model(model, bench_tokenizer(), config, adapters=manager, store=store))
    prompts = make_prompts(args.requests, args.min_prompt, args.max_prompt, (3, 1000), seed=args.seed)
    largest = max(args.counts)

    async def generate(rid: str, prompt: list[int], adapter: int) -> int:
        request = GenerationRequest(
            rid,
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True),
            adapters=(AdapterRef(f"{TENANT}/a{adapter}"),),
        )
        return sum([len(out.token_ids) async for out in front.generate(request)])

    async def run(count: int, repeat: int) -> Run:
        for i in range(largest):  # every run starts with the adapters on disk only
            manager.unload(f"{TENANT}/a{i}")
        await front.run_on_engine(manager.apply_drops)
        rng = random.Random(args.seed + repeat)
        weights = [1.0 / (i + 1) ** args.zipf for i in range(count)]
        picks = rng.choices(range(count), weights, k=args.requests)
        host, device = manager.host.stats, manager.slots.stats
        before = (host.loads, device.loads, host.evictions, device.evictions)
        start = time.perf_counter()
        tokens = await asyncio.gather(
            *(
                generate(f"{count}-{repeat}-{n}", p, a)
                for n, (p, a) in enumerate(zip(prompts, picks, strict=True))
            )
        )
        seconds = time.perf_counter() - start
        after = (host.loads, device.loads, host.evictions, device.evictions)
        deltas = [b - a for a, b in zip(before, after, strict=True)]
        return Run(count, len(set(picks)), seconds, sum(tokens), *deltas)

    async def main() -> list[Run]:
        for i in range(largest):
            files = lora_files(shapes, args.rank, seed=i, dtype=torch.float16)
            await front.admin.upload(TENANT, f"a{i}", files)
        await run(args.counts[0], -1)  # warm-up: thread pools, allocator
        return [await run(count, repeat) for repeat in range(args.repeats) for count in args.counts]

    try:
        return asyncio.run(main())
    finally:
        front.shutdown()


def throughput_table(runs: list[Run], args: argparse.Namespace) -> str:
    best = {}
    for r in runs:
        if r.registered not in best or r.seconds < best[r.registered].seconds:
            best[r.registered] = r
    base = best[args.counts[0]].tokens_per_s
    rows = [("adapters", "distinct used", "tok/s", f"vs {args.counts[0]}", "host loads", "device loads",
             "evictions host/device")]  # fmt: skip
    for count in args.counts:
        r = best[count]
        rows.append(
            (
                str(count),
                str(r.distinct),
                f"{r.tokens_per_s:.1f}",
                f"{r.tokens_per_s / base - 1:+.1%}",
                str(r.host_loads),
                str(r.device_loads),
                f"{r.host_evictions}/{r.device_evictions}",
            )
        )
    title = (
        f"Throughput, {args.shape}, rank-{args.rank} LoRA on {','.join(args.targets)} (fp16 files),"
        f" zipf s={args.zipf},"
        f" {args.requests} requests x {args.max_new_tokens} tokens, {args.slots} slots, host cache"
        f" {args.host_cache_mb:.0f} MB, {args.device} {args.dtype}, best of {args.repeats}"
    )
    return title + "\n" + format_rows(rows)


def format_rows(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--cold-adapters", type=int, default=30, help="adapters timed in the cold-load part")
    parser.add_argument("--shape", choices=list(SHAPES), default="bench-mid", help="throughput part's shape")
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 1000], help="registered adapters")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "k_proj", "v_proj", "o_proj"])
    parser.add_argument("--zipf", type=float, default=1.0, help="popularity exponent s")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--min-prompt", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=64)
    parser.add_argument("--slots", type=int, default=32, help="device adapter slots")
    parser.add_argument("--host-cache-mb", type=float, default=256.0)
    parser.add_argument("--kv-cache-mb", type=float, default=512.0)
    parser.add_argument("--max-running", type=int, default=32)
    parser.add_argument("--max-batched-tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-cold", action="store_true", help="only the throughput part")
    parser.add_argument("--skip-throughput", action="store_true", help="only the cold-load part")
    parser.add_argument(
        "--quick", action="store_true", help="small run: 8 cold adapters, 64 requests, 1 repeat"
    )
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.cold_adapters, args.requests, args.repeats, args.max_new_tokens = 8, 64, 1, 16
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    payload: dict[str, object] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": environment(args.device),
    }
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        if not args.skip_cold:
            cold = bench_cold_load(args, Path(tmp))
            print(cold_table(cold, args), end="\n\n", flush=True)
            payload["cold_load"] = asdict(cold)
        if not args.skip_throughput:
            runs = bench_throughput(args, Path(tmp))
            print(throughput_table(runs, args), flush=True)
            payload["throughput"] = [asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in runs]
    if args.json_out is not None:
        write_json(args.json_out, payload)


if __name__ == "__main__":
    main()
