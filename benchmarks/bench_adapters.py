"""Layer-level benchmark of mixed-adapter batches: peftserve's MultiAdapterLayer vs base-only vs PEFT.

One decode step (32 sequences x 1 token) and one prefill step (32 sequences x 16 tokens = 512 tokens) of
a full-model forward on [B, T] (plain transformers, sdpa, logits at the last position only), with rank-16
LoRA on all 7 projections: 1, 4, 8, 16, 32 distinct adapters (sequence i uses adapter i % k), and 32
distinct adapters of mixed ranks {8, 16, 32, 64}. Compared in the same run against the base model alone
and against PEFT's own mixed batch (`adapter_names=`). Adapters are made by peft, saved, and loaded by
peftserve's AdapterManager from the saved directories. "base" is the same wrapped model with no adapter
batch set (the wrappers then only call their base layer). Times are best-of-N, variants interleaved.
`--kernels parallel compiled` measures each CPU kernel set on a model of its own, in the same run.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_adapters.py --shape bench-1b
    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_adapters.py --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, Shape, build_model, synchronize  # noqa: E402

from peftserve.adapters import AdapterBatch, AdapterManager  # noqa: E402

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIXED_RANKS = (8, 16, 32, 64)
BATCH = 32
STEPS = {"decode": 1, "prefill": 16}
"""Tokens per sequence in each step; 32 sequences each."""


@dataclass
class Row:
    shape: str
    step: str
    adapters: str
    kernels: str
    base_ms: float
    ours_ms: float
    peft_ms: float | None
    adapter_bytes: int
    block_bytes: int

    @property
    def vs_base(self) -> float:
        return self.ours_ms / self.base_ms

    @property
    def peft_vs_base(self) -> float | None:
        return None if self.peft_ms is None else self.peft_ms / self.base_ms

    @property
    def speedup_vs_peft(self) -> float | None:
        return None if self.peft_ms is None else self.peft_ms / self.ours_ms


def interleaved_min_ms(fns: dict[str, Callable[[], object]], device: str, repeats: int) -> dict[str, float]:
    """Best-of-`repeats` wall time of each fn, run round-robin so every variant sees the same machine load.

    The minimum, not the median: on a shared 2-core machine other processes only ever add time.
    """
    for fn in fns.values():
        fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: min(t) for name, t in times.items()}


def make_adapters(peft_model: PeftModel, names_ranks: list[tuple[str, int]], seed: int) -> None:
    """Add LoRA adapters on all 7 projections with non-zero random A and B."""
    gen = torch.Generator().manual_seed(seed)
    for name, rank in names_ranks:
        if name not in peft_model.peft_config:
            peft_model.add_adapter(name, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=PROJECTIONS))
    with torch.no_grad():
        for pname, param in peft_model.named_parameters():
            if "lora_" in pname:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.01)


def run_shape(
    shape: Shape,
    ks: list[int],
    repeats: int,
    device: str,
    store: Path,
    dtype: torch.dtype = torch.float32,
    kernel_sets: list[str | None] | None = None,
    with_peft: bool = True,
    steps: list[str] | None = None,
) -> list[Row]:
    kernel_sets = kernel_sets or [None]
    uniform = [(f"r16-{i}", 16) for i in range(BATCH)]
    mixed = [(f"mixed-{i}", MIXED_RANKS[i % len(MIXED_RANKS)]) for i in range(BATCH)]

    # PEFT's model: the adapters are made (and saved) here, then measured with adapter_names=.
    peft_model = get_peft_model(
        build_model(shape, device, dtype, seed=0),
        LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS),
        adapter_name=uniform[0][0],
    )
    make_adapters(peft_model, uniform + mixed, seed=1)
    peft_model.save_pretrained(store, selected_adapters=[n for n, _ in uniform + mixed])
    peft_model.eval().requires_grad_(False)

    # One model per kernel set; the first also serves as "base" (no adapter batch set).
    served: dict[str, tuple[torch.nn.Module, AdapterManager]] = {}
    for kernels in kernel_sets:
        model = build_model(shape, device, dtype, seed=0)
        manager = AdapterManager(model, num_slots=BATCH, device=device, dtype=dtype, kernels=kernels)
        for build in manager.warm_up_work().values():  # what the engine's warm-up does: the compiled kernel
            build()
        for name, _ in uniform + mixed:
            subdir = store / name if (store / name).is_dir() else store
            manager.register(name, subdir)
        served[manager.kernels] = (model, manager)
    model, manager = next(iter(served.values()))
    block_bytes = shape.block_params * dtype.itemsize

    configs: list[tuple[str, list[str]]] = [(f"{k} x r16", [n for n, _ in uniform[:k]]) for k in ks]
    configs.append(("32 x r{8,16,32,64}", [n for n, _ in mixed]))
    rows: list[Row] = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for step in steps or STEPS:
            seq = STEPS[step]
            ids = torch.randint(3, shape.vocab, (BATCH, seq), generator=gen).to(device)  # [B, T]
            for _ in range(2):  # first-touch effects (allocator, page faults) stay out of the first row
                model(input_ids=ids, logits_to_keep=1)
                peft_model(input_ids=ids, adapter_names=[uniform[0][0]] * BATCH, logits_to_keep=1)
            for label, names in configs:
                per_seq = [names[i % len(names)] for i in range(BATCH)]

                def base(ids=ids) -> None:
                    model(input_ids=ids, logits_to_keep=1)

                def ours(ids, spans, model, manager) -> None:
                    manager.set_batch(AdapterBatch.build(spans, ids.numel(), device))
                    model(input_ids=ids, logits_to_keep=1)
                    manager.set_batch(None)

                def peft(ids=ids, per_seq=per_seq) -> None:
                    peft_model(input_ids=ids, adapter_names=per_seq, logits_to_keep=1)

                fns: dict[str, Callable[[], object]] = {"base": base}
                for kernels, (k_model, k_manager) in served.items():
                    slot_of = {n: k_manager.acquire(n) for n in names}
                    spans = [(i * seq, seq, ((slot_of[n], 1.0),)) for i, n in enumerate(per_seq)]
                    fns[kernels] = partial(ours, ids, spans, k_model, k_manager)
                if with_peft:
                    fns["peft"] = peft
                ms = interleaved_min_ms(fns, device, repeats)
                adapter_bytes = sum(manager.info(n).nbytes for n in names) * dtype.itemsize // 4
                for kernels, (_, k_manager) in served.items():
                    row = Row(
                        shape.name,
                        step,
                        label,
                        kernels,
                        ms["base"],
                        ms[kernels],
                        ms.get("peft"),
                        adapter_bytes,
                        block_bytes,
                    )
                    rows.append(row)
                    peft_note = "" if row.peft_ms is None else f", peft {row.peft_ms:.1f} ms"
                    print(
                        f"  {shape.name} {step} {label} [{kernels}]: ours {row.ours_ms:.1f} ms "
                        f"({row.vs_base:.2f}x base {row.base_ms:.1f} ms){peft_note}",
                        flush=True,
                    )
                    for n in names:
                        k_manager.release(n)
    return rows


def format_rows(rows: list[Row]) -> str:
    head = (
        "| shape | step | adapters | kernels | base ms | peftserve ms | vs base | PEFT ms | PEFT vs base "
        "| PEFT / peftserve "
        "| adapter MB/step | % of block weights |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        peft = (
            "| - | - | - "
            if r.peft_ms is None
            else (f"| {r.peft_ms:.1f} | {r.peft_vs_base:.2f}x | {r.speedup_vs_peft:.2f}x ")
        )
        lines.append(
            f"| {r.shape} | {r.step} | {r.adapters} | {r.kernels} | {r.base_ms:.1f} | {r.ours_ms:.1f} "
            f"| {r.vs_base:.2f}x {peft}"
            f"| {r.adapter_bytes / 2**20:.1f} | {100 * r.adapter_bytes / r.block_bytes:.0f}% |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=[*SHAPES, "both"], default="both")
    parser.add_argument("--quick", action="store_true", help="bench-mid only, k in {1, 32}, 3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="distinct adapter counts (1-32)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--kernels", nargs="+", default=None, help="adapter kernel sets to compare (default: the device's)"
    )
    parser.add_argument("--steps", nargs="+", choices=list(STEPS), default=list(STEPS))
    parser.add_argument("--no-peft", action="store_true", help="leave PEFT's mixed batch out")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = ["bench-mid", "bench-1b"] if args.shape == "both" else [args.shape]
    ks = [1, 4, 8, 16, 32]
    repeats = args.repeats
    if args.quick:
        shapes = ["bench-mid"] if args.shape == "both" else shapes
        ks, repeats = [1, 32], 3
    ks = args.ks or ks
    machine = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}, {args.dtype}"
    )
    print(f"machine: {machine}", flush=True)
    rows: list[Row] = []
    for name in shapes:
        with tempfile.TemporaryDirectory(prefix="bench-adapters-") as store:
            rows += run_shape(
                SHAPES[name],
                ks,
                repeats,
                args.device,
                Path(store),
                getattr(torch, args.dtype),
                kernel_sets=args.kernels,
                with_peft=not args.no_peft,
                steps=args.steps,
            )
    print()
    print(format_rows(rows))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": machine, "rows": [asdict(r) for r in rows]}
        args.json_out.write_text(json.dumps(payload, indent=2))


if __name__ == "__main__":
    main()
