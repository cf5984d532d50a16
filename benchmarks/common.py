"""Shared benchmark code: seeded prompts, results, tables, JSON.

Shapes, model building, the matmul rate and useful-FLOP counting live in the package
(`peftserve.bench.shapes`, `.models`, `.machine`, where `peftserve bench` uses them) and are
re-exported here under their old names; the FLOP formula is in `peftserve.bench.shapes`.
MFU = useful FLOPs/s divided by the dense matmul rate measured in the same run on the same device.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from peftserve.bench.config import VLLM_PYTHON
from peftserve.bench.machine import environment, matmul_rate, synchronize
from peftserve.bench.models import bench_tokenizer, build_model, llama_config
from peftserve.bench.shapes import FAMILY_SHAPES, SHAPES, Shape, useful_flops

__all__ = [
    "FAMILY_SHAPES",
    "SHAPES",
    "Result",
    "Shape",
    "add_vllm_arguments",
    "bench_tokenizer",
    "build_model",
    "environment",
    "format_table",
    "llama_config",
    "make_prompts",
    "matmul_rate",
    "result_dict",
    "synchronize",
    "timed",
    "useful_flops",
    "write_json",
]


def add_vllm_arguments(parser: argparse.ArgumentParser, threads_default: str) -> None:
    """The options of the opt-in vLLM peer (make peer-vllm): its interpreter, threads and LD_PRELOAD."""
    parser.add_argument(
        "--vllm-python", default=VLLM_PYTHON, help="interpreter of the vLLM peer (make peer-vllm)"
    )
    parser.add_argument(
        "--vllm-threads", type=int, default=None, help=f"OMP_NUM_THREADS of vLLM (default: {threads_default})"
    )
    parser.add_argument(
        "--vllm-preload",
        nargs="*",
        default=[],
        help="libraries in vLLM's LD_PRELOAD (e.g. the peer's libiomp5.so)",
    )


def make_prompts(
    n: int, min_len: int, max_len: int, id_range: tuple[int, int], seed: int = 0
) -> list[list[int]]:
    """n prompts of uniform length in [min_len, max_len], uniform random ids in [lo, hi)."""
    rng = random.Random(seed)
    lo, hi = id_range
    return [[rng.randrange(lo, hi) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


@dataclass
class Result:
    """One system's run on one workload; tokens_per_s is None when the system was skipped."""

    system: str
    shape: str
    requests: int
    generated_tokens: int = 0
    seconds: float = 0.0
    useful_flops: float = 0.0
    note: str = ""

    @property
    def tokens_per_s(self) -> float | None:
        return self.generated_tokens / self.seconds if self.seconds > 0 else None

    def mfu(self, peak_flops: float) -> float | None:
        return self.useful_flops / self.seconds / peak_flops if self.seconds > 0 else None


def timed(device: str, fn: Callable[[], list[int]]) -> tuple[list[int], float]:
    """Run fn (which returns tokens generated per request) and the wall time it took."""
    synchronize(device)
    start = time.perf_counter()
    generated = fn()
    synchronize(device)
    return generated, time.perf_counter() - start


def format_table(results: Sequence[Result], peak_flops: float, baseline: str) -> str:
    """A text table: system, tokens/s, ratio to the baseline system, MFU, notes."""
    base = next((r.tokens_per_s for r in results if r.system == baseline and r.tokens_per_s), None)
    rows = [("system", "tok/s", f"vs {baseline}", "MFU", "seconds", "note")]
    for r in results:
        tps, mfu = r.tokens_per_s, r.mfu(peak_flops)
        rows.append(
            (
                r.system,
                f"{tps:.1f}" if tps else "-",
                f"{tps / base:.2f}x" if tps and base else "-",
                f"{mfu:.1%}" if mfu is not None else "-",
                f"{r.seconds:.1f}" if r.seconds else "-",
                r.note,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def result_dict(result: Result, peak_flops: float) -> dict[str, object]:
    """A result as JSON-ready data, derived fields included."""
    return {**asdict(result), "tokens_per_s": result.tokens_per_s, "mfu": result.mfu(peak_flops)}


def write_json(path: Path, payload: dict[str, object]) -> None:
    """Write the run's JSON, creating parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
