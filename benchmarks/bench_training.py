"""Training throughput and trainable parameters of each trainer method against full fine-tuning.

Every method trains the same model on the same synthetic data (text records of ~`--seq-len` tokens from
the embedded corpus), the same batches, steps and clipping, in one run: peftserve's trainer (`train()`)
for lora / adalora / prefix / sparse (fisher and gps), and a plain AdamW loop over all parameters for
`full`. tokens/s counts non-padding tokens fed per second of optimizer steps (load, evaluation and the
sparse calibration pass are outside it; `wall s` includes them).

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_training.py            # bench-mid
    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_training.py --quick    # default model
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from peftserve.bench.machine import environment
from peftserve.bench.models import bench_tokenizer, build_model
from peftserve.bench.shapes import SHAPES
from peftserve.model.default_model import ensure_default_model
from peftserve.model.loader import load_base_model
from peftserve.model.tokenizer import corpus_lines, save_tokenizer
from peftserve.training import AdaLoraOptions, LoraOptions, PrefixOptions, SparseOptions, TrainConfig, train
from peftserve.training.data import BatchOrder, collate, load_dataset
from peftserve.training.loop import train_step

METHODS = {
    "lora": LoraOptions(rank=16, alpha=32),
    "adalora": AdaLoraOptions(init_r=16, target_r=8),
    "prefix": PrefixOptions(num_virtual_tokens=16),
    "sparse-fisher": SparseOptions(budget=16, rule="fisher", calibration_examples=16),
    "sparse-gps": SparseOptions(budget=16, rule="gps", calibration_examples=16),
}
"""Adapter methods at rank 16 (sparse: the entry count of a rank-16 LoRA), all Linear layers targeted."""


@dataclass(frozen=True)
class Row:
    """One method's measurement."""

    method: str
    trainable_params: int
    total_params: int
    tokens_per_s: float
    wall_s: float


def write_data(path: Path, tokenizer: PreTrainedTokenizerBase, examples: int, seq_len: int) -> Path:
    """`examples` text records of about seq_len tokens each, cut from the embedded corpus."""
    lines, records, cursor = corpus_lines(), [], 0
    for _ in range(examples):
        words: list[str] = []
        while len(tokenizer(" ".join(words))["input_ids"]) < seq_len:
            words += lines[cursor % len(lines)].split()
            cursor += 1
        while len(tokenizer(" ".join(words))["input_ids"]) >= seq_len:
            words.pop()
        records.append({"text": " ".join(words)})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def model_dir(args: argparse.Namespace, scratch: Path) -> Path:
    """The default model, or a saved random-weight model of the shape."""
    if args.shape == "default":
        return ensure_default_model()
    directory = scratch / args.shape
    build_model(SHAPES[args.shape]).save_pretrained(directory)
    save_tokenizer(bench_tokenizer(), directory)
    return directory


def full_finetune(base: Path, data: Path, args: argparse.Namespace) -> Row:
    """AdamW on every parameter, with the trainer's batches, step function and clipping."""
    started = time.perf_counter()
    loaded = load_base_model(str(base), args.device, "float32")
    model = loaded.model.requires_grad_(True).train()
    examples = load_dataset(data, loaded.tokenizer, args.seq_len + 1).examples
    order = BatchOrder(len(examples), args.batch_size, seed=0)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    tokens, steps_started = 0, time.perf_counter()
    for step in range(args.steps):
        batch = collate(
            [examples[i] for i in order.batch(step)], loaded.tokenizer.pad_token_id, loaded.device
        )
        train_step(model, optimizer, params, batch, 1e-5, 1.0)
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum())
    seconds = time.perf_counter() - steps_started
    count = sum(p.numel() for p in params)
    return Row("full", count, count, tokens / seconds, time.perf_counter() - started)


def adapter_run(name: str, base: Path, data: Path, args: argparse.Namespace) -> Row:
    """peftserve's trainer on one method (no output directory: only the timings are wanted)."""
    started = time.perf_counter()
    config = TrainConfig(
        data=str(data),
        base=str(base),
        method=METHODS[name],
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.seq_len + 1,
        device=args.device,
        progress=False,
    )
    result = train(config)
    wall = time.perf_counter() - started
    return Row(name, result.trainable_params, result.total_params, result.tokens_per_s, wall)


def table(rows: list[Row]) -> str:
    full = next(r for r in rows if r.method == "full")
    lines = [("method", "trainable", "% of model", "tokens/s", "vs full", "wall s")]
    for r in rows:
        share = 100.0 * r.trainable_params / full.total_params
        speed = r.tokens_per_s / full.tokens_per_s
        lines.append(
            (
                r.method,
                f"{r.trainable_params:,}",
                f"{share:.3f}%",
                f"{r.tokens_per_s:,.0f}",
                f"{speed:.2f}x",
                f"{r.wall_s:.1f}",
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="bench-mid", choices=("default", *SHAPES))
    parser.add_argument("--quick", action="store_true", help="the default model (hidden 256), 10 steps")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    parser.add_argument("--methods", nargs="+", default=["full", *METHODS], choices=["full", *METHODS])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.shape, args.steps = "default", 10
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-training-") as scratch:
        base = model_dir(args, Path(scratch))
        tokenizer = AutoTokenizer.from_pretrained(base)
        data = write_data(Path(scratch) / "data.jsonl", tokenizer, args.batch_size * 4, args.seq_len)
        for name in args.methods:
            rows.append(
                full_finetune(base, data, args) if name == "full" else adapter_run(name, base, data, args)
            )
            print(f"{name}: {rows[-1].tokens_per_s:,.0f} tokens/s", file=sys.stderr)
    env = environment(args.device)
    print(f"shape {args.shape}, {args.steps} steps of {args.batch_size} x ~{args.seq_len} tokens; {env}")
    if any(r.method == "full" for r in rows):
        print(table(rows))
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "shape": args.shape,
            "args": {k: str(v) for k, v in vars(args).items()},
            "environment": env,
        }
        args.json_out.write_text(json.dumps({**payload, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
