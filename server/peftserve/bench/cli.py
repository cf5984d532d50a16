"""`peftserve bench`: the serving benchmark's command line (argparse only; torch is imported on run)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from peftserve.bench.config import DTYPES, PEERS, POPULARITIES, SYSTEMS, BenchConfig, quick
from peftserve.bench.shapes import BENCH_SHAPES, PROJECTIONS

DESCRIPTION = """\
Serving benchmark: a seeded many-adapter trace served by peftserve over gRPC (a real server in a
subprocess, requests sent concurrently at their arrival times with the async SDK), by the same server
with every request on the base model (the limit), and by Hugging Face PEFT used directly (one request
at a time with set_adapter, and static batches with adapter_names=); opt-in, vLLM's CPU build from the
peer virtualenv of `make peer-vllm` (--systems ... vllm vllm-base). Then an adapter-count sweep and a
load sweep. Prints tables with ratios against peftserve and writes results.json and a PNG into --out.
Defaults are the issue's target workload on bench-1b (tens of minutes on 2 cores); --quick is about a
minute (bench-mid, 16 short requests). Flags given override either preset."""


def _rate(value: str) -> float:
    rate = float(value)
    if not rate > 0:
        raise argparse.ArgumentTypeError(f"rate must be > 0 or inf, got {value}")
    return rate


# (flag, WorkloadSpec field, type, nargs, help); flags left out keep the preset's value.
_WORKLOAD_FLAGS: tuple[tuple[str, str, Callable[[str], object], int | None, str], ...] = (
    ("--requests", "requests", int, None, "requests in the main trace"),
    ("--adapters", "num_adapters", int, None, "adapters of the main trace"),
    ("--popularity", "popularity", str, None, "adapter popularity"),
    ("--alpha", "alpha", float, None, "power/zipf exponent (S-LoRA power: 1 is uniform, smaller skews)"),
    ("--rate", "rate", _rate, None, "mean arrivals per second; inf sends everything at t=0"),
    ("--cv", "cv", float, None, "gamma inter-arrival coefficient of variation (1 = Poisson)"),
    ("--prompt-len", "prompt_len", int, 2, "prompt length range LO HI (uniform)"),
    ("--output-len", "output_len", int, 2, "generated tokens range LO HI (uniform)"),
    ("--seed", "seed", int, None, "seed of traces, model and adapters"),
)
# (flag, BenchConfig field, type, nargs, help)
_CONFIG_FLAGS: tuple[tuple[str, str, Callable[[str], object], int | str | None, str], ...] = (
    ("--shape", "shape", str, None, "model shape of DESIGN.md"),
    ("--ranks", "ranks", int, "+", "ranks of the main and sweep adapters (each draws one)"),
    ("--targets", "targets", str, "+", "projections of the main adapters"),
    ("--sweep-adapters", "sweep_adapters", int, "*", "adapter counts of the sweep (none: skip it)"),
    ("--sweep-requests", "sweep_requests", int, None, "requests per sweep and load trace"),
    ("--sweep-targets", "sweep_targets", str, "+", "projections of the sweep adapters"),
    ("--mixed-ranks", "mixed_ranks", int, "*", "ranks of the mixed-rank sweep run (none: skip it)"),
    ("--load-fractions", "load_fractions", float, "*", "load sweep rates as fractions of saturation"),
    ("--systems", "systems", str, "+", "systems of the main trace"),
    ("--peft-batch-size", "peft_batch_size", int, None, "rows of a PEFT static batch"),
    ("--peft-sequential-limit", "peft_sequential_limit", int, None, "PEFT one at a time: first N (0: all)"),
    ("--peft-max-adapters", "peft_max_adapters", int, None, "largest sweep point PEFT runs"),
    ("--slo-ttft", "slo_ttft_s", float, None, "SLO bound on time to first token, seconds"),
    ("--repeats", "repeats", int, None, "tries per system and trace; the least disturbed is kept"),
    ("--max-running", "max_running", int, None, "server: requests decoding at once"),
    ("--max-batched-tokens", "max_batched_tokens", int, None, "server: tokens per engine step"),
    ("--adapter-slots", "adapter_slots", int, None, "server: adapter slots (default: --max-running)"),
    ("--threads", "threads", int, None, "torch CPU threads of the server and the PEFT baselines"),
    ("--device", "device", str, None, "cpu or cuda"),
    ("--dtype", "dtype", str, None, "every system's dtype (default: float32 on CPU, bfloat16 on CUDA)"),
    ("--vllm-python", "vllm_python", str, None, "interpreter of the vLLM peer (make peer-vllm)"),
    ("--vllm-threads", "vllm_threads", int, None, "OMP_NUM_THREADS of vLLM (default: its own)"),
    (
        "--vllm-preload",
        "vllm_preload",
        str,
        "+",
        "libraries in vLLM's LD_PRELOAD (e.g. the peer's libiomp5.so)",
    ),
)
_CHOICES: dict[str, Sequence[str]] = {
    "--popularity": POPULARITIES,
    "--shape": tuple(BENCH_SHAPES),
    "--targets": PROJECTIONS,
    "--sweep-targets": PROJECTIONS,
    "--systems": SYSTEMS + PEERS,
    "--dtype": DTYPES,
}


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's flags, shared by `peftserve bench` and benchmarks/bench_serving.py."""
    parser.add_argument("--quick", action="store_true", help="the ~1 minute preset (bench-mid, few requests)")
    parser.add_argument("--out", type=Path, default=Path("bench_out/serving"), help="where results go")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the saved model, the adapter store and the server log here and reuse them next time"
        " (default: a temporary directory, removed at the end)",
    )
    groups = (
        (parser.add_argument_group("main trace"), "w", _WORKLOAD_FLAGS),
        (parser.add_argument_group("adapters, sweeps, systems and server"), "c", _CONFIG_FLAGS),
    )
    for group, prefix, flags in groups:
        for flag, field, kind, nargs, text in flags:
            choices = _CHOICES.get(flag)
            group.add_argument(
                flag,
                dest=f"{prefix}_{field}",
                type=kind,
                nargs=nargs,
                default=None,
                choices=choices,
                metavar=("LO", "HI") if nargs == 2 else flag[2:].upper().replace("-", "_"),
                help=f"{text}: {', '.join(choices)}" if choices else text,
            )


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """The preset (--quick or the full run) with every given flag applied; ValueError if inconsistent."""
    preset = quick() if args.quick else BenchConfig()
    workload: dict[str, object] = {}
    for _, field, _, nargs, _ in _WORKLOAD_FLAGS:
        value = getattr(args, f"w_{field}")
        if value is not None:
            workload[field] = tuple(value) if nargs else value
    changes: dict[str, object] = {"workload": replace(preset.workload, **workload)} if workload else {}
    for _, field, _, nargs, _ in _CONFIG_FLAGS:
        value = getattr(args, f"c_{field}")
        if value is not None:
            changes[field] = tuple(value) if nargs else value
    if changes.get("peft_sequential_limit") == 0:
        changes["peft_sequential_limit"] = None
    return replace(preset, **changes)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print its tables, write results.json and the PNG into --out."""
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from peftserve.bench.report import report_text, write_plot, write_results
    from peftserve.bench.suite import run_suite

    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="peftserve-bench-"))
    try:
        result = run_suite(
            config, work_dir.resolve(), log=lambda line: print(line, file=sys.stderr, flush=True)
        )
    finally:
        if args.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    results = write_results(result, args.out)  # first: the raw numbers survive a failing report
    plot = write_plot(result, args.out)
    print(report_text(result))
    print(f"\nwrote {results}" + (f" and {plot}" if plot else " (no sweep ran: no plot)"))
    return 0


def add_bench_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench` to the `peftserve` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="serving benchmark: peftserve vs the base model vs PEFT on many-adapter traces",
        description=DESCRIPTION,
    )
    add_bench_arguments(parser)
    parser.set_defaults(run=run_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of benchmarks/bench_serving.py (the same flags as `peftserve bench`)."""
    parser = argparse.ArgumentParser(prog="bench_serving.py", description=DESCRIPTION)
    add_bench_arguments(parser)
    return run_bench(parser.parse_args(argv))
