"""CPU Linear layers: torch's F.linear (MKL sgemm) vs the server's prepacked oneDNN path (runner/linear.py).

Every projection of a DESIGN.md shape and its lm_head, at the row counts a serving step feeds them
(1-3 rows: a few decodes; 4-64: decode batches; 256-1024: prefill chunks). Both kernels run in the
same process, interleaved, best of several bursts; the table gives GFLOP/s and the speed-up.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_linear.py --shape bench-1b --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, environment  # noqa: E402

from peftserve.bench.report import format_rows  # noqa: E402
from peftserve.bench.shapes import PROJECTIONS  # noqa: E402
from peftserve.runner.linear import onednn_usable, pack, packed_linear  # noqa: E402

ROWS = (1, 2, 3, 4, 16, 32, 64, 256, 1024)


def best_seconds(kernel: Callable[[], object], bursts: int = 5, burst_s: float = 0.05) -> float:
    """Fastest per-call time over several short bursts (a shared machine disturbs some of them)."""
    kernel()
    best = float("inf")
    for _ in range(bursts):
        reps, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < burst_s or reps < 2:
            kernel()
            reps += 1
        best = min(best, elapsed / reps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if not onednn_usable(dtype):
        sys.exit("oneDNN linears are not usable in this torch build")
    shape = SHAPES[args.shape]
    layers = {name: shape.projection_shape(name) for name in PROJECTIONS}
    layers["lm_head"] = (shape.vocab, shape.hidden)

    rows_out = []
    with torch.inference_mode():
        for name, (out_features, in_features) in layers.items():
            weight = torch.randn(out_features, in_features, dtype=dtype)
            packed = pack(weight)
            for rows in ROWS:
                x = torch.randn(rows, in_features, dtype=dtype)
                plain = best_seconds(lambda x=x, w=weight: F.linear(x, w))
                onednn = best_seconds(lambda x=x, p=packed: packed_linear(x, p))
                flops = 2 * rows * out_features * in_features
                rows_out.append(
                    [name, f"{out_features}x{in_features}", str(rows), f"{flops / plain / 1e9:.1f}",
                     f"{flops / onednn / 1e9:.1f}", f"{plain / onednn:.2f}x"]
                )  # fmt: skip
    print(f"{args.shape}, {args.dtype}, {torch.get_num_threads()} thread(s); {environment('cpu')}")
    headers = ["layer", "out x in", "rows", "torch GFLOP/s", "oneDNN GFLOP/s", "speed-up"]
    print(format_rows([headers, *rows_out]))


if __name__ == "__main__":
    main()
