"""Decode-step overhead of each served adapter kind at 32 distinct adapters, vs the base model.

One decode step (32 sequences x 1 token) of the whole model (plain transformers, sdpa, logits at the
last position only), every sequence with an adapter of its own, for each kind: LoRA r16 (the reference),
DoRA r16, LoHa r4 (as many parameters as LoRA r16: served as rank 16 from its factors), LoKr r16 (served
from its Kronecker factors), VeRA r256 (peft's default; the 32 adapters share one projection pair, as
adapters trained with peft's default projection_prng_key do) on all 7 projections, and IA³ on peft's
default targets (k, v, down). Adapters are made by peft with non-zero random weights, saved, and loaded
by peftserve's AdapterManager from the saved directories. "base" is the same wrapped model with no
adapter batch. Every kind's adapters are resident at once, and each of N rounds times base and every
kind back to back (best of N per variant), so the ratios of one run share the machine's load.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_kinds.py --shape bench-1b --threads 1
    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_kinds.py --shape bench-mid --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import IA3Config, LoHaConfig, LoKrConfig, LoraConfig, VeraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapters import PROJECTIONS, interleaved_min_ms  # noqa: E402
from common import SHAPES, Shape, build_model  # noqa: E402

from peftserve.adapters import AdapterBatch, AdapterManager  # noqa: E402

BATCH = 32
KINDS = {
    "lora r16": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS),
    "dora r16": lambda: LoraConfig(r=16, lora_alpha=32, target_modules=PROJECTIONS, use_dora=True),
    "loha r4": lambda: LoHaConfig(r=4, alpha=8, target_modules=PROJECTIONS),
    "lokr r16": lambda: LoKrConfig(r=16, alpha=32, target_modules=PROJECTIONS),
    "vera r256": lambda: VeraConfig(r=256, target_modules=PROJECTIONS),
    "ia3": lambda: IA3Config(
        target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
    ),
}
"""Kind label -> peft config of each of its 32 adapters."""
TRAINED = ("lora_A", "lora_B", "hada_", "lokr_", "vera_lambda_d")


@dataclass
class Row:
    shape: str
    kind: str
    base_ms: float
    ours_ms: float
    slot_bytes: int
    """Bytes of the 32 adapters' slots (what the step reads beside the base weights)."""
    shared_bytes: int
    """Bytes held once for all of them (VeRA's projections)."""
    forms: str
    block_bytes: int

    @property
    def vs_base(self) -> float:
        return self.ours_ms / self.base_ms


def make_adapters(shape: Shape, label: str, store: Path, device: str) -> list[Path]:
    """32 adapters of one kind, made by peft with random non-trivial weights, saved under store/label."""
    config = KINDS[label]
    names = [f"a{i}" for i in range(BATCH)]
    model = get_peft_model(build_model(shape, device, torch.float32, seed=0), config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config())
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen).to(param.device) * 0.01
            if "magnitude" in pname:
                param.mul_(1 + noise)
            elif "ia3_l" in pname or "lambda_b" in pname:
                param.copy_(1 + noise)  # scalings around 1
            elif any(t in pname for t in TRAINED):
                param.copy_(noise)
    out = store / label.replace(" ", "-")
    model.save_pretrained(out, selected_adapters=names)
    del model
    gc.collect()
    return [out / n if (out / n).is_dir() else out for n in names]


def run_shape(shape: Shape, repeats: int, device: str, store: Path) -> list[Row]:
    """Every kind's 32 adapters resident at once, and base and every kind timed round-robin: each round
    steps through all the variants back to back, so the ratios come from the same machine load."""
    dtype = torch.float32
    dirs = {label: make_adapters(shape, label, store, device) for label in KINDS}
    model = build_model(shape, device, dtype, seed=0)
    manager = AdapterManager(
        model, num_slots=BATCH * len(KINDS), device=device, dtype=dtype, host_cache_bytes=1 << 40
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape.vocab, (BATCH, 1), generator=gen).to(device)  # [B, 1]: one decode token
    steps: dict[str, Callable[[], None]] = {"base": lambda: model(input_ids=ids, logits_to_keep=1)}
    infos = {}
    for label, paths in dirs.items():
        names = [f"{label.replace(' ', '-')}/{i}" for i in range(BATCH)]
        for name, path in zip(names, paths, strict=True):
            manager.register(name, path)
        spans = [(i, 1, ((manager.acquire(name), 1.0),)) for i, name in enumerate(names)]
        infos[label] = [manager.info(n) for n in names]

        def step(spans=spans) -> None:
            manager.set_batch(AdapterBatch.build(spans, ids.numel(), device))
            model(input_ids=ids, logits_to_keep=1)
            manager.set_batch(None)

        steps[label] = step
    with torch.inference_mode():
        ms = interleaved_min_ms(steps, device, repeats)
    manager.close()
    rows = []
    for label, kind_infos in infos.items():
        first = kind_infos[0]
        rows.append(
            Row(
                shape.name,
                label,
                ms["base"],
                ms[label],
                sum(i.device_bytes for i in kind_infos),
                first.shared_bytes,
                ", ".join(f"{name} x {count}" for name, count in first.forms),
                shape.block_params * dtype.itemsize,
            )
        )
        print(f"  {shape.name} decode, 32 x {label}: {ms[label]:.1f} ms ({ms[label] / ms['base']:.2f}x base)")
    return rows


def format_rows(rows: list[Row]) -> str:
    lines = [
        "| shape | kind (32 distinct) | served as (per adapter) | base ms | peftserve ms | vs base "
        "| slot MB / step | % of block weights | shared MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.shape} | {r.kind} | {r.forms} | {r.base_ms:.1f} | {r.ours_ms:.1f} | {r.vs_base:.2f}x "
            f"| {r.slot_bytes / 2**20:.1f} | {100 * r.slot_bytes / r.block_bytes:.1f}% "
            f"| {r.shared_bytes / 2**20:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="bench-1b")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = (
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    print(f"machine: {machine}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-kinds-") as store:
        rows = run_shape(SHAPES[args.shape], args.repeats, args.device, Path(store))
    print()
    print(format_rows(rows))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(
            json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2)
        )


if __name__ == "__main__":
    main()
