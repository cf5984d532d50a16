"""`peftserve bench` end to end on a tiny model: a real server, every system, well-formed output."""

from __future__ import annotations

import json

from peftserve.cli import main

TINY = [
    "bench", "--shape", "bench-tiny", "--requests", "6", "--adapters", "3", "--ranks", "4",
    "--prompt-len", "4", "12", "--output-len", "2", "6", "--sweep-adapters", "1", "3",
    "--sweep-requests", "4", "--mixed-ranks", "2", "4", "--load-fractions", "1.0",
    "--peft-batch-size", "3", "--peft-sequential-limit", "2", "--max-running", "4", "--threads", "1",
]  # fmt: skip
SYSTEMS = ("peftserve", "peftserve-http", "base", "peft-batched", "peft-sequential")


def test_bench_runs_every_system_and_writes_results(tmp_path, capsys):
    out = tmp_path / "out"
    assert main([*TINY, "--out", str(out), "--work-dir", str(tmp_path / "work")]) == 0

    table = capsys.readouterr().out
    assert "vs peftserve" in table and "Targets of the issue" in table
    for system in (*SYSTEMS, "peftserve-mixed"):
        assert f"\n{system} " in table

    results = json.loads((out / "results.json").read_text())
    assert {"config", "environment", "matmul_flops_per_s", "pools", "traces", "runs", "targets"} <= set(
        results
    )
    runs = {(r["scenario"], r["system"], r["num_adapters"]) for r in results["runs"]}
    assert {("main", s) for s in SYSTEMS} <= {(scenario, system) for scenario, system, _ in runs}
    assert {("adapters", "peftserve", 1), ("adapters", "peftserve", 3)} <= runs
    assert any(scenario == "load" for scenario, _, _ in runs)
    for run in results["runs"]:
        assert run["metrics"]["failed"] == 0, run["note"]
        assert run["metrics"]["completed"] == len(run["requests"]) > 0
        assert run["metrics"]["tokens_per_s"] > 0
        assert all(r["first_token"] <= r["finished"] for r in run["requests"])
    assert {t["name"] for t in results["targets"]} >= {
        "peftserve / base model",
        "MFU of peftserve",
        "peftserve over HTTP / over gRPC",
        "TTFT p50 over gRPC / over HTTP",
    }
    http, grpc = (
        next(r for r in results["runs"] if r["system"] == s) for s in ("peftserve-http", "peftserve")
    )
    assert http["metrics"]["generated_tokens"] == grpc["metrics"]["generated_tokens"]  # the same trace

    png = (out / "serving.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_no_plot_without_a_sweep(tmp_path):
    """With both sweeps off, the report writes no figure (it would be four empty panels)."""
    from peftserve.bench.config import BenchConfig
    from peftserve.bench.report import write_plot
    from peftserve.bench.suite import SuiteResult

    result = SuiteResult(BenchConfig(), {}, 0.0, {}, {}, runs=[])
    assert write_plot(result, tmp_path) is None
    assert not any(tmp_path.iterdir())
