"""Start-up of the servers as a user meets it, against vLLM's server on the same model directory.

For each system, in a fresh process, the seconds from launching the server until

  serving  its /health answers 200 (what a load balancer waits for)
  ready    a 4-token completion sent then (greedy, over the OpenAI API) is answered
  warm     peftserve: its warm-up has ended (`peftserve_warming` 0 on /metrics), full speed from the next
           step; vLLM warms up before it serves, so its warm time is its ready time

Systems: `peftserve` (the defaults: warm-up in the background, and the packed weights an earlier start
kept, here in --packed-cache; where none are kept yet, an untimed first start packs and keeps them),
`peftserve-packing` (`--packed-cache off`: packing at every start), `peftserve-before` (`--warm-up before
--packed-cache off`), and `vllm` (its CPU build's OpenAI server, `make peer-vllm`; left out when the
peer is not built). They take turns, --rounds times. The model is bench_startup.py's (bench-1b at
--layers layers, safetensors in --dtype), built once into --model-dir; launching includes each server's
imports. The page cache stays warm (the model is read once before the first round); with --cold, the
model's files and the kept ones are dropped from it before each launch (the libraries' files stay).

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_server_start.py --layers 40 \\
        --dtype bfloat16 --model-dir /tmp/startup-bf16-40
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_startup import build, evict, kept  # noqa: E402
from common import SHAPES, add_vllm_arguments, environment  # noqa: E402

from peftserve.bench.report import format_rows  # noqa: E402
from peftserve.bench.server import ServerProcess  # noqa: E402
from peftserve.bench.vllm_system import VllmServer, VllmSpec, free_port  # noqa: E402

SYSTEMS = ("peftserve", "peftserve-packing", "peftserve-before", "vllm")
POLL_S = 0.05
TIMEOUT_S = 600.0


def get(url: str) -> tuple[int, str]:
    """(status, body) of a GET; status 0 when nothing answers yet."""
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return 0, ""


def until(began: float, done: Callable[[], bool], alive: Callable[[], bool]) -> float:
    """Seconds from `began` until done() holds, polling; RuntimeError when the server exits first."""
    deadline = time.monotonic() + TIMEOUT_S
    while not done():
        if not alive() or time.monotonic() > deadline:
            raise RuntimeError("the server exited or did not answer in time")
        time.sleep(POLL_S)
    return time.perf_counter() - began


def complete(root: str) -> None:
    """A 4-token greedy completion of the base model, named as /v1/models lists it first."""
    model = json.loads(get(f"{root}/v1/models")[1])["data"][0]["id"]
    body = {"model": model, "prompt": "hello world", "max_tokens": 4, "temperature": 0.0}
    request = urllib.request.Request(
        f"{root}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        answer = json.loads(response.read())
    if answer["usage"]["completion_tokens"] != 4:
        raise RuntimeError(f"expected 4 tokens, got {answer['usage']}")


def warming(root: str) -> bool:
    """Whether peftserve's /metrics still counts warm-up work (or does not answer yet)."""
    status, text = get(f"{root}/metrics")
    gauges = [f for f in text_string_to_metric_families(text) if f.name == "peftserve_warming"]
    return status != 200 or not gauges or gauges[0].samples[0].value > 0


def start(system: str, args: argparse.Namespace, log_dir: Path, keep: bool = False) -> dict[str, float]:
    """Launch one server, time it, stop it; keep: once its packed weights are kept (a first start)."""
    if args.cold:
        evict(args.model_dir)
        evict(args.packed_cache)
    began = time.perf_counter()
    if system == "vllm":
        spec = VllmSpec(
            python=Path(args.vllm_python),
            model_dir=args.model_dir,
            dtype=args.dtype,
            kv_cache_gib=1,
            threads=args.vllm_threads,
            preload=tuple(map(Path, args.vllm_preload)),
        )
        server = VllmServer(spec, log_dir / "vllm.log")
        root, alive = server.url, lambda: server.proc.poll() is None
    else:
        port = free_port()
        argv = ["--model", str(args.model_dir), "--dtype", args.dtype, "--kv-cache-mb", "512"]
        argv += ["--http-port", str(port), "--grace-s", "1"]
        argv += ["--packed-cache", str(args.packed_cache) if system == "peftserve" else "off"]
        if system == "peftserve-before":
            argv += ["--warm-up", "before"]
        server = ServerProcess.serve(argv, log_dir / f"{system}.log")
        root, alive = f"http://127.0.0.1:{port}", lambda: server.proc.poll() is None
    try:
        serving = until(began, lambda: get(f"{root}/health")[0] == 200, alive)
        complete(root)
        ready = time.perf_counter() - began
        warm = ready if system == "vllm" else until(began, lambda: not warming(root), alive)
        if keep:
            until(began, lambda: kept(args.packed_cache, args.model_dir, args.dtype), alive)
    finally:
        server.stop()
    return {"serving": serving, "ready": ready, "warm": warm}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    parser.add_argument("--model-dir", type=Path, required=True, help="built once, kept between runs")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/bench-server-start"))
    parser.add_argument(
        "--packed-cache", type=Path, default=None, help="for peftserve (default: <model dir>-packed)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="drop the model's and kept files from the page cache before each"
    )
    add_vllm_arguments(parser, threads_default="its own")
    args = parser.parse_args()
    build(args.model_dir, args.shape, args.layers, getattr(torch, args.dtype))
    args.packed_cache = args.packed_cache or args.model_dir.with_name(f"{args.model_dir.name}-packed")
    # every round starts from a warm page cache, the first too: the weights' files and the kept ones
    for path in [*args.model_dir.glob("*.safetensors"), *args.packed_cache.rglob("*.bin")]:
        with path.open("rb") as f:
            while f.read(1 << 26):
                pass
    systems = [s for s in args.systems.split(",") if s != "vllm" or Path(args.vllm_python).is_file()]
    if "peftserve" in systems and not kept(args.packed_cache, args.model_dir, args.dtype):
        first = start("peftserve", args, args.log_dir, keep=True)
        print("peftserve, first start (packs, then keeps)", {k: round(v, 2) for k, v in first.items()})
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in systems}
    for _ in range(args.rounds):
        for system in systems:
            runs[system].append(start(system, args, args.log_dir))
            print(system, {k: round(v, 2) for k, v in runs[system][-1].items()}, flush=True)
    rows = [["system", "serving s", "ready s", "warm s"]]
    for system, results in runs.items():
        spans = [f"{min(r[k] for r in results):.1f}-{max(r[k] for r in results):.1f}" for k in results[0]]
        rows.append([system, *spans])
    print(f"{args.shape}, {args.layers} layers, {args.dtype}; {args.rounds} rounds, systems taking turns")
    print("page cache: " + ("cold (evicted before each launch)" if args.cold else "warm"))
    print(environment("cpu"))
    print(format_rows(rows))


if __name__ == "__main__":
    main()
