"""The GPU check's steps (run by gpu_check.sh after the install): tests on the device, then benchmarks.

Each step runs as a subprocess with its own time limit inside an overall deadline; a step that fails or
runs out of time is recorded as such and the next one still runs. Everything lands in one JSON
(`gpu_check.json`: the machine, each step's command, exit code, seconds and results) and one markdown
table (`gpu_check.md`) in --out.

    python benchmarks/gpu_check.py --out gpu_check_out                  # on a GPU: the real check
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/dry   # the same steps, tiny, on CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Step:
    name: str
    command: list[str]
    limit_s: float
    results: Path | None = None
    """The JSON the step writes (read back into the check's JSON)."""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Outcome:
    name: str
    command: str
    status: str
    """passed, failed (exit code), timed out, or skipped (no time left)"""
    seconds: float
    tail: str
    """The last lines of its output."""
    results: object = None


def steps(args: argparse.Namespace) -> list[Step | None]:
    py, out, device = sys.executable, args.out, args.device
    dtype = "float32" if device == "cpu" else "bfloat16"
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-rs"]
    if args.tiny:
        engine = ["--quick", "--requests", "8", "--sequential-limit", "2"]
        adapters = ["--shape", "bench-mid", "--ks", "1", "32", "--repeats", "1"]
        serving = ["--quick", "--sweep-adapters", "--load-fractions", "--systems", "peftserve", "base"]
        tests += ["-m", "triton", "tests/adapters/test_triton_kernels.py"]
    else:
        engine = ["--shape", "bench-1b", "--requests", "64", "--sequential-limit", "4"]
        adapters = ["--shape", "bench-1b", "--ks", "1", "32", "--repeats", "10"]
        serving = [
            "--shape", "bench-1b", "--adapters", "100", "--requests", "64", "--sweep-adapters",
            "--load-fractions", "--systems", "peftserve", "base", "peft-sequential",
            "--peft-sequential-limit", "8",
        ]  # fmt: skip
        tests += ["-m", "gpu or triton", "tests"]
    threads = ["--threads", "1"] if device == "cpu" else []  # a shared CPU box: no OpenMP barriers
    common = [*threads, "--device", device, "--dtype", dtype]
    graphs = [py, "benchmarks/bench_engine.py", *engine, *common, "--systems", "peftserve", "--cuda-graphs"]
    return [
        Step("tests (gpu, triton) on the device", tests, 120),
        Step(
            "engine vs transformers",
            [py, "benchmarks/bench_engine.py", *engine, *common, "--json-out", str(out / "engine.json")],
            70,
            out / "engine.json",
        ),
        Step(
            "engine, decode from CUDA graphs",
            [*graphs, "--json-out", str(out / "engine-graphs.json")],
            40,
            out / "engine-graphs.json",
        )
        if device == "cuda"
        else None,
        Step(
            "adapter layers: 32 distinct vs base",
            [
                py,
                "benchmarks/bench_adapters.py",
                *adapters,
                *common,
                "--json-out",
                str(out / "adapters.json"),
            ],
            60,
            out / "adapters.json",
        ),
        Step(
            "serving 100 adapters",
            [py, "benchmarks/bench_serving.py", *serving, "--device", device, "--out", str(out / "serving")],
            150,
            out / "serving" / "results.json",
        ),
    ]


def run_step(step: Step, limit_s: float, log_dir: Path) -> Outcome:
    """Run one step with its output in a log file (printed after), killed at its time limit."""
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'server'}:{ROOT / 'client'}:{ROOT}", **step.env}
    shown = " ".join(step.command)
    print(f"== {step.name} (at most {limit_s:.0f} s): {shown}", flush=True)
    log_path = log_dir / (step.name.split(":")[0].replace(" ", "-").replace(",", "") + ".log")
    with log_path.open("w") as log:
        proc = subprocess.Popen(step.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=limit_s)
            status = "passed" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            status = "timed out"
    output = log_path.read_text(errors="replace")
    print(output, flush=True)
    results = None
    if step.results is not None and step.results.exists():
        results = json.loads(step.results.read_text())
    tail = "".join(output.splitlines(keepends=True)[-15:])
    return Outcome(step.name, shown, status, time.perf_counter() - start, tail, results)


def machine(device: str) -> dict[str, object]:
    import torch

    info: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["gpu"] = None
        info["cpu"] = platform.processor() or platform.machine()
    return info


def headline(outcomes: list[Outcome]) -> list[tuple[str, str, str]]:
    """(what, measured, target) of the issue's targets, from the steps' results."""
    rows: list[tuple[str, str, str]] = []
    by_name = {o.name: o.results for o in outcomes if isinstance(o.results, dict)}
    adapters = by_name.get("adapter layers: 32 distinct vs base")
    for row in adapters.get("rows", []) if adapters else []:
        if row["adapters"] == "32 x r16" and row["step"] == "decode":
            measured = (
                f"{row['ours_ms'] / row['base_ms']:.2f}x ({row['ours_ms']:.2f} vs {row['base_ms']:.2f} ms)"
            )
            rows.append((f"{row['shape']} decode, 32 distinct r16 vs base", measured, "<= 1.15x"))
    serving = by_name.get("serving 100 adapters")
    main = {r["system"]: r for r in serving.get("runs", []) if r["scenario"] == "main"} if serving else {}
    ours = main.get("peftserve", {}).get("metrics", {}).get("tokens_per_s")
    for system, what, target in (
        ("base", "serving 100 adapters vs the base model (tok/s)", ">= 0.9x"),
        ("peft-sequential", "serving 100 adapters vs PEFT one request at a time", ">= 10x"),
    ):
        theirs = main.get(system, {}).get("metrics", {}).get("tokens_per_s")
        if ours and theirs:
            rows.append((what, f"{ours / theirs:.2f}x ({ours:.1f} vs {theirs:.1f} tok/s)", target))
    for name in ("engine vs transformers", "engine, decode from CUDA graphs"):
        engine = by_name.get(name)
        for r in engine.get("results", []) if engine else []:
            if r.get("tokens_per_s"):
                rows.append((f"{name}: {r['shape']} {r['system']}", f"{r['tokens_per_s']:.1f} tok/s", ""))
    return rows


def table(info: dict[str, object], outcomes: list[Outcome]) -> str:
    lines = [
        f"GPU check on {info.get('gpu') or info.get('cpu')} ({info['device']}), torch {info['torch']}, "
        f"triton {info['triton']}",
        "",
        "| step | status | seconds |",
        "|---|---|---|",
        *(f"| {o.name} | {o.status} | {o.seconds:.0f} |" for o in outcomes),
        "",
        "| measured | value | target |",
        "|---|---|---|",
        *(f"| {what} | {value} | {target} |" for what, value, target in headline(outcomes)),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small shapes and workloads (a dry run)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--budget-s", type=float, default=420.0, help="all steps together")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    info = machine(args.device)
    print(f"machine: {info}", flush=True)
    deadline = time.perf_counter() + args.budget_s
    outcomes: list[Outcome] = []
    slower = 4 if args.device == "cpu" else 1  # a dry run on CPU: the same steps, slower
    for step in (s for s in steps(args) if s is not None):
        left = deadline - time.perf_counter()
        if left < 10:
            outcomes.append(Outcome(step.name, " ".join(step.command), "skipped (no time left)", 0.0, ""))
            continue
        outcomes.append(run_step(step, min(slower * step.limit_s, left), args.out))
    payload = {"machine": info, "budget_s": args.budget_s, "steps": [asdict(o) for o in outcomes]}
    payload["headline"] = [{"what": w, "value": v, "target": t} for w, v, t in headline(outcomes)]
    (args.out / "gpu_check.json").write_text(json.dumps(payload, indent=1) + "\n")
    text = table(info, outcomes)
    (args.out / "gpu_check.md").write_text(text)
    print("\n" + text, flush=True)
    return 0 if all(o.status == "passed" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
