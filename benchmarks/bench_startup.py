"""Start-up time and resident memory of the engine on a multi-GB model, against loading its weights.

Builds a random-weight model of a DESIGN.md shape with --layers layers (bench-1b at 16 layers: 0.85B
parameters, 3.4 GB in float32), saves it as safetensors in --dtype once, then starts each system in a
fresh process, one after the other:

  runtime  the imports alone (python, torch, transformers, peftserve): what every system starts from
  load     load_base_model, then every weight read once: what loading the weights costs (the floor;
           safetensors are mapped, so a weight is only read from the file when first touched)
  torch    LLMEngine.create with cpu_linear=torch (plain F.linear), then one 4-token request
  onednn   LLMEngine.create with the defaults (packed weights, warm-up in the background), then the
           same request
  before   as onednn, with warm_up=before: attention compiled and weights packed before it serves
  kept     as onednn, with the packed weights an earlier start kept in --packed-cache (the defaults
           keep them in ~/.cache/peftserve/packed; the other systems here keep none); where none are
           kept yet, a first start packs and writes them, reported as its own row ("kept, first")

It reports the wall time until the engine was created, until the system is ready (for the engines: the
request served, so every weight has been read), and until it is warm (when the last of the warm-up's
work ended, beside the request: full speed from then on; where none was left when the engine was
created, from creation; a kept start's warm-up is reading the kept weights in), resident
memory then (VmRSS) and its peak (VmHWM), each also over the weight bytes, and over the weights once the
runtime's own memory is taken off. The adapter host cache is empty; the KV pool (512 MiB) is mapped
zeroed, so its pages count once blocks are written. With --cold, the model's files are dropped from the
page cache before each system starts. With --idle, the request is sent once the warm-up is done, so
that `warm` is the start-up alone, with nothing served beside it.

    PYTHONPATH=server:client:. .venv/bin/python benchmarks/bench_startup.py --layers 16
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SHAPES, bench_tokenizer, build_model, environment  # noqa: E402

from peftserve.bench.report import format_rows  # noqa: E402

SYSTEMS = ("runtime", "load", "torch", "onednn", "before", "kept")
PAGE = 4096


def memory_gb() -> tuple[float, float]:
    """(resident, peak resident) of this process in GB, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) * 1024 / 1e9  # kB
    return fields["VmRSS"], fields["VmHWM"]


def start(system: str, model_dir: Path, dtype: str, packed_cache: Path, idle: bool) -> dict[str, float]:
    """Start one system in this process; seconds until ready, and memory with it alive. idle: the request
    waits until the warm-up is done (the start-up alone, nothing served beside it)."""
    from peftserve.config import EngineConfig
    from peftserve.engine.engine import LLMEngine
    from peftserve.engine.request import GenerationRequest, SamplingParams
    from peftserve.model.loader import load_base_model

    began = time.perf_counter()
    started, pending = None, []
    if system == "runtime":
        created = began
    elif system == "load":
        started = load_base_model(str(model_dir), "cpu", dtype)
        for param in started.model.parameters():
            param.detach().view(-1)[:: PAGE // param.element_size()].sum()  # one read per page
        created = time.perf_counter()
    else:
        linear = "torch" if system == "torch" else "onednn"
        warm_up = "before" if system == "before" else "background"
        config = EngineConfig(
            model=str(model_dir),
            dtype=dtype,
            cpu_linear=linear,
            kv_cache_mb=512,
            warm_up=warm_up,
            packed_cache=str(packed_cache) if system == "kept" else "off",
        )
        started = LLMEngine.create(config)
        created = time.perf_counter()
        pending = list(started.runner.warming)
        warmed: list[float] = []

        def wait_warm_up() -> None:
            started.runner.wait_warm_up()
            warmed.append(time.perf_counter())

        waiting = threading.Thread(target=wait_warm_up)
        waiting.start()
        if idle:
            waiting.join()
        sampling = SamplingParams(max_new_tokens=4, ignore_eos=True)
        started.generate_all([GenerationRequest(request_id="r", prompt="hello world", sampling=sampling)])
    ready = time.perf_counter()
    if pending:
        waiting.join()
    warm = warmed[0] if pending else created
    rss, peak = memory_gb()
    if system == "kept" and started.runner.keeping is not None:
        started.runner.keeping.result()  # a first start writes them whole before it exits
    weights = json.loads((model_dir / "weights.json").read_text())["bytes"]
    return {
        "created": created - began,
        "ready": ready - began,
        "warm": warm - began,
        "rss": rss,
        "peak": peak,
        "weights": weights / 1e9,
        "pending": pending,
    }


def build(model_dir: Path, shape_name: str, layers: int, dtype: torch.dtype) -> None:
    """Save the model and tokenizer once; weights.json holds the weight bytes."""
    if (model_dir / "weights.json").is_file():
        return
    model = build_model(replace(SHAPES[shape_name], layers=layers), dtype=dtype)
    model.save_pretrained(model_dir, safe_serialization=True)
    bench_tokenizer().save_pretrained(model_dir)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    (model_dir / "weights.json").write_text(json.dumps({"bytes": weights}))


def kept(packed_cache: Path, model_dir: Path, dtype: str) -> bool:
    """Whether packed weights of the model in this dtype are kept under packed_cache for this torch and
    CPU (runner/packed_cache.py's key)."""
    from peftserve.runner.packed_cache import PackedCache

    return PackedCache(packed_cache, model_dir, getattr(torch, dtype)).entry.is_dir()


def evict(directory: Path) -> None:
    """Drop the files of a model (or of its kept packed weights) from the page cache, so that the next
    start reads them from the disk (the host of a virtual machine may still hold them: a cold start here
    is at best cool)."""
    for path in (p for p in directory.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_child(system: str, model_dir: Path, dtype: str, packed_cache: Path, idle: bool) -> dict[str, float]:
    command = [sys.executable, __file__, "--child", system, "--model-dir", str(model_dir), "--dtype", dtype,
               "--packed-cache", str(packed_cache), *(["--idle"] if idle else [])]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench-1b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--model-dir", type=Path, default=None, help="kept between runs (default: temporary)")
    parser.add_argument(
        "--packed-cache", type=Path, default=None, help="for kept (default: <model dir>-packed)"
    )
    parser.add_argument(
        "--cold", action="store_true", help="evict the model's (and kept weights') files before each system"
    )
    parser.add_argument(
        "--idle",
        action="store_true",
        help="the request waits for the warm-up (start-up alone, nothing beside)",
    )
    parser.add_argument("--child", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(start(args.child, args.model_dir, args.dtype, args.packed_cache, args.idle)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        model_dir = args.model_dir or Path(tmp) / "model"
        packed_cache = args.packed_cache or model_dir.with_name(f"{model_dir.name}-packed")
        build(model_dir, args.shape, args.layers, getattr(torch, args.dtype))
        rows = [["system", "created s", "ready s", "warm s", "RSS GB", "peak GB", "RSS / weights",
                 "peak / weights", "(RSS - runtime) / weights", "warm-up left when created"]]  # fmt: skip
        runtime = 0.0
        systems = args.systems.split(",")
        if "kept" in systems and not kept(packed_cache, model_dir, args.dtype):
            systems.insert(systems.index("kept"), "kept, first")
        for system in systems:
            if args.cold:
                evict(model_dir)
                evict(packed_cache)
            r = run_child(system.partition(",")[0], model_dir, args.dtype, packed_cache, args.idle)
            runtime = r["rss"] if system == "runtime" else runtime
            rows.append(
                [system, f"{r['created']:.2f}", f"{r['ready']:.2f}", f"{r['warm']:.2f}", f"{r['rss']:.2f}",
                 f"{r['peak']:.2f}",
                 f"{r['rss'] / r['weights']:.2f}x", f"{r['peak'] / r['weights']:.2f}x",
                 f"{(r['rss'] - runtime) / r['weights']:.2f}x" if runtime else "-",
                 ", ".join(r["pending"]) or "-"]
            )  # fmt: skip
    cache = "cold (evicted before each system)" if args.cold else "warm"
    print(f"{args.shape}, {args.layers} layers, {args.dtype}, weights {r['weights']:.2f} GB")
    print(f"page cache: {cache}")
    print("request: " + ("after the warm-up (--idle)" if args.idle else "as soon as the engine is created"))
    print(environment("cpu"))
    print(format_rows(rows))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
