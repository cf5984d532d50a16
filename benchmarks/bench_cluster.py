"""`peftserve cluster` against one server on the same machine: what Ray's proxy adds to a request, and
two 1-thread replicas against one 2-thread server on the same power-law adapter trace.

Model: the embedded default model (`peftserve model path`), adapters: rank-8 LoRA on the attention
projections, uploaded through each server's own API. Runs the servers one after another and prints
ratios measured within one run (the box may be shared: absolute times move, ratios less so).

    .venv/bin/python benchmarks/bench_cluster.py --out benchmarks/results/cluster.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from peftserve.bench.machine import environment
from peftserve.bench.server import ServerProcess
from peftserve_client import Client

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.deploy.conftest import cluster_process, write_adapter  # noqa: E402


def latency(address: str, n: int) -> list[float]:
    """Seconds of n sequential 1-token requests on the base model (after 5 warm-up requests)."""
    with Client(address, timeout=60) as client:
        for _ in range(5):
            client.generate("Hello", max_new_tokens=1)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.generate("Hello", max_new_tokens=1)
            times.append(time.perf_counter() - start)
    return times


def trace_run(address: str, adapters: Path, names: list[str], trace: list[str], new_tokens: int, conc: int):
    """Upload the adapters, then run the trace with `conc` concurrent callers; (seconds, tokens)."""
    with Client(address, timeout=300) as client:
        for name in names:
            client.upload_adapter(adapters / name, f"default/{name}")
        client.generate("warm up", max_new_tokens=2)
        start = time.perf_counter()
        with ThreadPoolExecutor(conc) as pool:
            results = list(
                pool.map(
                    lambda n: client.generate(
                        "Once upon a time", adapter_id=n, max_new_tokens=new_tokens, ignore_eos=True
                    ),
                    trace,
                )
            )
        seconds = time.perf_counter() - start
    return seconds, sum(r.usage.completion_tokens for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--adapters", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-requests", type=int, default=60)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        write_adapter(root / "adapters" / name, seed=1000 + i)
    rng = random.Random(0)
    trace = rng.choices(names, [1 / (k + 1) ** 1.1 for k in range(len(names))], k=args.requests)
    common = ["--adapter-slots", str(args.slots)]
    report: dict = {"environment": environment("cpu"), "args": vars(args) | {"out": str(args.out)}}

    def run_single(threads: int, tag: str) -> dict:
        server = ServerProcess.serve(
            [*common, "--threads", str(threads), "--store", str(root / f"store-{tag}")]
        )
        try:
            address = server.wait_ready(120)
            lat = latency(address, args.latency_requests)
            seconds, tokens = trace_run(
                address, root / "adapters", names, trace, args.new_tokens, args.concurrency
            )
        finally:
            server.stop()
        return {"p50_ms": 1e3 * statistics.median(lat), "seconds": seconds, "tokens_per_s": tokens / seconds}

    report["single_1_thread"] = run_single(1, "s1")
    report["single_2_threads"] = run_single(2, "s2")
    cluster = cluster_process(
        [*common, "--replicas", "2", "--threads", "1", "--store", str(root / "store-cluster")],
        root / "cluster.log",
    )
    try:
        address = cluster.wait_ready(300)
        lat = latency(address, args.latency_requests)
        seconds, tokens = trace_run(
            address, root / "adapters", names, trace, args.new_tokens, args.concurrency
        )
    finally:
        cluster.stop(60)
    report["cluster_2x1"] = {
        "p50_ms": 1e3 * statistics.median(lat),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
    }
    s1, s2, c = report["single_1_thread"], report["single_2_threads"], report["cluster_2x1"]
    report["proxy_added_ms_p50"] = c["p50_ms"] - s1["p50_ms"]
    report["cluster_over_2_thread_server"] = c["tokens_per_s"] / s2["tokens_per_s"]
    print(json.dumps(report, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
