"""Decode-step attention: gathering each context then SDPA (sdpa) against reading the pool in place, with
torch's flex attention compiled (flex) or our C++ kernel (cpp).

One layer of a DESIGN.md shape, N decode rows whose contexts are uniform in [--min-context,
--max-context], their blocks scattered over a pool sized like the engine's. The paths run the
server's own code (runner/attention.py, runner/flex.py, runner/paged_kernel.py) on the same cache,
best of several bursts; per-step metadata (built once per step for all layers) is timed apart from the
per-layer attention. A decode step's attention = layers x per-layer + metadata.

--engine: whole engine steps instead. One engine (flex compiled first, the kernel built) serves --rows
requests (prompts uniform in 16-256, 64 new tokens); its decode-only steps take the paths in turn, so
neighbouring steps of nearly the same batch compare them under the same machine load.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_attention.py --shape bench-1b --rows 64
    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_attention.py --shape bench-1b --engine
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear import best_seconds  # noqa: E402
from common import SHAPES, environment  # noqa: E402

from peftserve.bench.report import format_rows  # noqa: E402
from peftserve.runner.attention import AttentionMetadata, paged_attention  # noqa: E402
from peftserve.runner.flex import PagedLayout, flex_paged_attention, unwritten_tails  # noqa: E402
from peftserve.runner.kv_cache import PagedKVCache  # noqa: E402
from peftserve.runner.paged_kernel import kernel_paged_attention  # noqa: E402

PATHS = {"sdpa": None, "flex": flex_paged_attention, "cpp": kernel_paged_attention}
"""Each path by its --attention name, and what reads the pools in place on it (None: gathered)."""


class _Layer(torch.nn.Module):
    layer_idx = 0


def decode_step(cache: PagedKVCache, contexts: list[int], tables: list[list[int]], path: str):
    """The step's metadata as the runner builds it (runner/model_runner.py)."""
    bs = cache.block_size
    lens = torch.tensor(contexts)  # [B]
    lmax = max(contexts)
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])  # [B, W]
    slots = (table[:, :, None] * bs + torch.arange(bs)).flatten(1)[:, :lmax]  # [B, Lmax]
    slots.masked_fill_(torch.arange(lmax)[None] >= lens[:, None], cache.null_slot)
    last = [t[(c - 1) // bs] * bs + (c - 1) % bs for t, c in zip(tables, contexts, strict=True)]
    meta = AttentionMetadata(
        cache=cache,
        slot_mapping=torch.tensor(last),
        decode_token_idx=torch.arange(len(contexts)),
        decode_slots=slots,
        decode_ctx_lens=lens,
        prefills=[],
    )
    if PATHS[path] is not None:
        chunks = [(c - 1, 1, t) for c, t in zip(contexts, tables, strict=True)]
        tails = unwritten_tails(chunks, bs) if path == "flex" else []
        if tails:
            cache.values.index_fill_(1, torch.tensor(tails), 0)
        meta.paged = PagedLayout.build(chunks, bs, cache.keys.shape[1], torch.device("cpu"))
        meta.attend = PATHS[path]
        if path == "flex":  # the step's share of the per-layer work, built once per step as the runner does
            meta.paged.visible(None)
        else:
            meta.paged.first(None)
    return meta


def engine_steps(shape, args: argparse.Namespace) -> None:
    """Decode steps of one engine, taking the paths in turn; mean seconds of each."""
    from common import bench_tokenizer, build_model, make_prompts

    from peftserve.config import EngineConfig
    from peftserve.engine.engine import LLMEngine
    from peftserve.engine.request import GenerationRequest, SamplingParams

    prompts = make_prompts(args.rows, 16, 256, (3, 1024), seed=args.seed)
    kv_mb = args.rows * (256 + 64) * shape.kv_bytes_per_token() / 2**20
    config = EngineConfig(
        dtype=args.dtype, kv_cache_mb=1.25 * kv_mb, max_running=args.rows, block_size=args.block_size,
        attention="flex", warm_up="before",
    )  # fmt: skip
    engine = LLMEngine.from_model(build_model(shape, seed=args.seed), bench_tokenizer(), config)
    runner, execute = engine.runner, engine.runner.execute
    times: dict[str, list[float]] = {path: [] for path in PATHS}

    def timed_execute(step):
        if not all(c.is_decode for c in step.chunks):
            runner.in_place = kernel_paged_attention
            return execute(step)
        path = min(PATHS, key=lambda p: len(times[p]))
        runner.in_place = PATHS[path]
        start = time.perf_counter()
        out = execute(step)
        times[path].append(time.perf_counter() - start)
        return out

    runner.execute = timed_execute
    sampling = SamplingParams(max_new_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(GenerationRequest(request_id=str(i), prompt_token_ids=prompt, sampling=sampling))
    while engine.has_unfinished():
        engine.step()
    mean = {path: sum(t) / len(t) for path, t in times.items()}
    print(environment("cpu"))
    print(
        f"{shape.name}, {args.dtype}: {args.rows} requests, decode-only steps alternating, "
        f"threads {torch.get_num_threads()}"
    )
    rows = [["path", "decode steps", "mean step ms", "tok/s in decode", "speed-up"]]
    for path in PATHS:
        rows.append([
            path, str(len(times[path])), f"{mean[path] * 1e3:.0f}", f"{args.rows / mean[path]:.1f}",
            f"{mean['sdpa'] / mean[path]:.2f}x",
        ])  # fmt: skip
    print(format_rows(rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--min-context", type=int, default=24)
    parser.add_argument("--max-context", type=int, default=512)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", action="store_true", help="time whole engine decode steps instead")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    if args.engine:
        with torch.inference_mode():
            engine_steps(shape, args)
        return
    heads, kv_heads, head_dim = shape.heads, shape.kv_heads, shape.hidden // shape.heads
    bs = args.block_size
    rng = random.Random(args.seed)
    contexts = [rng.randint(args.min_context, args.max_context) for _ in range(args.rows)]
    needed = sum(-(-c // bs) for c in contexts)
    num_blocks = int(1.25 * needed)
    order = rng.sample(range(num_blocks), needed)
    tables, at = [], 0
    for c in contexts:
        tables.append(order[at : at + -(-c // bs)])
        at += len(tables[-1])
    dtype = getattr(torch, args.dtype)
    cache = PagedKVCache(1, num_blocks, bs, kv_heads, head_dim, dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(args.seed)
    cache.keys[:, : cache.null_slot].normal_(generator=g)
    cache.values[:, : cache.null_slot].normal_(generator=g)
    q = torch.randn(1, heads, args.rows, head_dim, generator=g).to(dtype)  # [1, Hq, B, D]
    kv = torch.randn(1, kv_heads, args.rows, head_dim, generator=g).to(dtype)  # this step's K/V (cached)

    outs, rows = {}, []
    with torch.inference_mode():
        metas = {p: decode_step(cache, contexts, tables, p) for p in PATHS}
        start = time.perf_counter()
        for path, meta in metas.items():
            outs[path] = paged_attention(_Layer(), q, kv, kv, None, peftserve_attn=meta)[0]
        first_call_s = time.perf_counter() - start
        for path in PATHS:
            step_s = best_seconds(lambda p=path: decode_step(cache, contexts, tables, p))
            meta = metas[path]
            layer_s = best_seconds(
                lambda m=meta: paged_attention(_Layer(), q, kv, kv, None, peftserve_attn=m)
            )
            rows.append((path, step_s, layer_s))
    diff = {p: (outs[p].float() - outs["sdpa"].float()).abs().max().item() for p in ("flex", "cpp")}
    base = rows[0][1] + shape.layers * rows[0][2]
    table = []
    for path, step_s, layer_s in rows:
        total = step_s + shape.layers * layer_s
        table.append(
            [
                path,
                f"{layer_s * 1e3:.2f}",
                f"{step_s * 1e3:.2f}",
                f"{total * 1e3:.1f}",
                f"{base / total:.2f}x",
            ]
        )
    print(environment("cpu"))
    print(
        f"{shape.name}, {args.dtype}: {args.rows} decode rows, "
        f"contexts {args.min_context}-{args.max_context} "
        f"(mean {sum(contexts) / len(contexts):.0f}), block {bs}, pool {num_blocks} blocks, "
        f"threads {torch.get_num_threads()}; max |flex - sdpa| = {diff['flex']:.1e}, |cpp - sdpa| = "
        f"{diff['cpp']:.1e}; first calls (compile, build) "
        f"{first_call_s:.1f} s"
    )
    header = [
        "path",
        "per layer ms",
        "step metadata ms",
        f"step attention ms ({shape.layers} layers)",
        "speed-up",
    ]
    print(format_rows([header, *table]))


if __name__ == "__main__":
    main()
