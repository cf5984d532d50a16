"""What a run produces: text tables (ratios against peftserve), the issue's targets, results.json, a PNG."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from peftserve.bench.suite import Run, SuiteResult

RESULTS_NAME = "results.json"
PLOT_NAME = "serving.png"


def _num(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_rows(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns with a rule under the header row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _events(run: Run) -> str:
    """Adapter loads/evictions the server counted during the run; n/a when it exports no such counter."""
    if run.system == "base":
        return "-"
    if not run.system.startswith("peftserve"):
        return "n/a"
    if run.adapter_events is None:
        return "n/a"
    return " ".join(f"{k.removeprefix('peftserve_')}={v:g}" for k, v in sorted(run.adapter_events.items()))


def _noise(run: Run) -> str:
    return "?" if run.other_cores is None else f"{run.other_cores:.1f}"


def _rate(run: Run) -> str:
    return "saturating" if math.isinf(run.rate) else f"{run.rate:.2f}"


Column = tuple[str, Callable[[Run], str]]
"""A table column: its header and how a run fills it."""


def _seconds(value: float | None) -> str:
    return _num(value, ".2f", "s")


def _millis(value: float | None) -> str:
    return _num(None if value is None else 1e3 * value, ".0f", "ms")


def _ratio_to(reference: float | None) -> Callable[[Run], str]:
    return lambda r: _num(r.metrics.tokens_per_s / reference if reference else None, ".2f", "x")


def _per_cpu(run: Run) -> str:
    return _num(run.tokens_per_cpu_s, ".1f")


def _cpu_ratio_to(reference: Run | None) -> Callable[[Run], str]:
    base = reference.tokens_per_cpu_s if reference else None
    return lambda r: _num(r.tokens_per_cpu_s / base if base and r.tokens_per_cpu_s else None, ".2f", "x")


def _mfu(result: SuiteResult) -> Callable[[Run], str]:
    return lambda r: _num(r.mfu(result.matmul_flops_per_s), ".1%")


def _table(runs: Sequence[Run], columns: Sequence[Column]) -> str:
    return format_rows([tuple(h for h, _ in columns), *(tuple(f(r) for _, f in columns) for r in runs)])


def main_table(result: SuiteResult) -> str:
    """Every system on the main trace, with tok/s ratios against peftserve."""
    runs = [r for r in result.runs if r.scenario == "main"]
    ours = next((r.metrics.tokens_per_s for r in runs if r.system == "peftserve"), None)
    columns: list[Column] = [
        ("system", lambda r: r.system),
        ("req/s", lambda r: _num(r.metrics.requests_per_s)),
        ("tok/s", lambda r: _num(r.metrics.tokens_per_s, ".1f")),
        ("vs peftserve", _ratio_to(ours)),
        ("tok/CPU-s", _per_cpu),
        ("vs", _cpu_ratio_to(result.find("main", "peftserve"))),
        ("TTFT p50", lambda r: _seconds(r.metrics.ttft_p50)),
        ("p90", lambda r: _seconds(r.metrics.ttft_p90)),
        ("p99", lambda r: _seconds(r.metrics.ttft_p99)),
        ("TPOT p50", lambda r: _millis(r.metrics.tpot_p50)),
        ("p99", lambda r: _millis(r.metrics.tpot_p99)),
        ("E2E mean", lambda r: _seconds(r.metrics.latency_mean)),
        ("p99", lambda r: _seconds(r.metrics.latency_p99)),
        ("SLO", lambda r: f"{r.metrics.slo_attainment:.0%}"),
        ("MFU", _mfu(result)),
        ("other load", _noise),
        ("adapter loads/evictions", _events),
        ("note", lambda r: r.note),
    ]
    return _table(runs, columns)


def adapters_table(result: SuiteResult) -> str:
    """The adapter-count sweep, tok/s against the base model on the same trace."""
    runs = [r for r in result.runs if r.scenario == "adapters"]
    base = next((r.metrics.tokens_per_s for r in runs if r.system == "base"), None)
    columns: list[Column] = [
        ("system", lambda r: r.system),
        ("adapters", lambda r: str(r.num_adapters or "-")),
        ("tok/s", lambda r: _num(r.metrics.tokens_per_s, ".1f")),
        ("vs base", _ratio_to(base)),
        ("tok/CPU-s", _per_cpu),
        ("vs", _cpu_ratio_to(result.find("adapters", "base"))),
        ("TTFT p50", lambda r: _seconds(r.metrics.ttft_p50)),
        ("p90", lambda r: _seconds(r.metrics.ttft_p90)),
        ("SLO", lambda r: f"{r.metrics.slo_attainment:.0%}"),
        ("MFU", _mfu(result)),
        ("other load", _noise),
        ("adapter loads/evictions", _events),
    ]
    return _table(runs, columns)


def load_table(result: SuiteResult) -> str:
    """The load sweep: the same trace at increasing arrival rates."""
    columns: list[Column] = [
        ("system", lambda r: r.system),
        ("rate (req/s)", _rate),
        ("req/s", lambda r: _num(r.metrics.requests_per_s)),
        ("tok/s", lambda r: _num(r.metrics.tokens_per_s, ".1f")),
        ("TTFT p50", lambda r: _seconds(r.metrics.ttft_p50)),
        ("p90", lambda r: _seconds(r.metrics.ttft_p90)),
        ("p99", lambda r: _seconds(r.metrics.ttft_p99)),
        ("TPOT p50", lambda r: _millis(r.metrics.tpot_p50)),
        ("SLO", lambda r: f"{r.metrics.slo_attainment:.0%}"),
        ("other load", _noise),
    ]
    return _table([r for r in result.runs if r.scenario == "load"], columns)


@dataclass(frozen=True)
class Target:
    """One of the issue's targets as measured in this run."""

    name: str
    value: float | None
    """None when the run did not measure it (system or sweep point left out)."""
    threshold: float
    detail: str
    per_cpu: float | None = None
    """The same ratio in tokens per CPU-second of each system's own processes (robust to other load)."""

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value >= self.threshold


def _ratio(a: Run | None, b: Run | None) -> float | None:
    if a is None or b is None or not b.metrics.tokens_per_s:
        return None
    return a.metrics.tokens_per_s / b.metrics.tokens_per_s


def _cpu_ratio(a: Run | None, b: Run | None) -> float | None:
    if a is None or b is None or not a.tokens_per_cpu_s or not b.tokens_per_cpu_s:
        return None
    return a.tokens_per_cpu_s / b.tokens_per_cpu_s


def _target(name: str, a: Run | None, b: Run | None, threshold: float, detail: str) -> Target:
    """A tok/s ratio target, with the per-CPU-second ratio beside it."""
    return Target(name, _ratio(a, b), threshold, detail, _cpu_ratio(a, b))


def _ttft_target(http: Run | None, grpc: Run | None, detail: str) -> Target:
    """TTFT p50 over HTTP within 10% of gRPC's, as the ratio gRPC / HTTP >= 1/1.1."""
    ttfts = (grpc.metrics.ttft_p50, http.metrics.ttft_p50) if http and grpc else (None, None)
    value = ttfts[0] / ttfts[1] if ttfts[0] and ttfts[1] else None
    return Target("TTFT p50 over gRPC / over HTTP", value, round(1 / 1.1, 2), detail)


def targets(result: SuiteResult) -> list[Target]:
    """The issue's targets: generated tok/s ratios in this run, and MFU of the main scenario."""
    config = result.config
    ours = result.find("main", "peftserve")
    main = f"{config.workload.num_adapters} adapters, {config.main_pool.label}"
    counts = sorted(config.sweep_adapters) or [0]
    largest = counts[-1]
    near_ten = min(counts, key=lambda c: abs(math.log(max(c, 1) / 10)))
    sweep_targets = ",".join(config.sweep_targets)
    mixed = f"{largest} adapters, ranks {set(config.mixed_ranks)} on {sweep_targets}"
    sweep = f"rank {set(config.ranks)} on {sweep_targets}"
    mfu = ours.mfu(result.matmul_flops_per_s) if ours else None
    at_largest = result.find("adapters", "peftserve", largest)
    at_ten = result.find("adapters", "peftserve", near_ten)
    return [
        _target("peftserve / PEFT one at a time", ours, result.find("main", "peft-sequential"), 5, main),
        _target("peftserve / PEFT static batches", ours, result.find("main", "peft-batched"), 1.5, main),
        _target("peftserve / base model", ours, result.find("main", "base"), 0.9, main),
        _target(
            "peftserve mixed ranks / base model",
            result.find("adapters", "peftserve-mixed"),
            result.find("adapters", "base"),
            0.85,
            mixed,
        ),
        _target(f"tok/s at {largest} adapters / at {near_ten}", at_largest, at_ten, 0.95, sweep),
        _target("peftserve over HTTP / over gRPC", result.find("main", "peftserve-http"), ours, 0.95, main),
        _ttft_target(result.find("main", "peftserve-http"), ours, main),
        Target(
            "MFU of peftserve",
            mfu,
            0.5,
            f"{main}; dense matmul {result.matmul_flops_per_s / 1e9:.0f} GFLOP/s",
        ),
    ]


def targets_table(items: Sequence[Target]) -> str:
    rows = [("target", "measured", "needed", "met", "per CPU-s", "workload")]
    for t in items:
        met = "n/a" if t.met is None else ("yes" if t.met else "NO")
        rows.append(
            (t.name, _num(t.value, ".2f"), f">= {t.threshold:g}", met, _num(t.per_cpu, ".2f"), t.detail)
        )
    return format_rows(rows)


def report_text(result: SuiteResult) -> str:
    """All tables of a run with the workload and the machine they were measured on."""
    config, env = result.config, result.environment
    w = config.workload
    rate = "saturating (all at t=0)" if math.isinf(w.rate) else f"{w.rate:g} req/s (gamma cv {w.cv:g})"
    pools = "; ".join(
        f"{t}: {p['count']} x {p['label']} ({p['mean_adapter_mb']:.1f} MB each)"
        for t, p in result.pools.items()
    )
    machine = (
        f"{env.get('device')}, {env.get('cpus')} CPUs, {env.get('threads')} torch thread(s) per process,"
        f" load average {env.get('load_average_1m', '?')} at the end"
    )
    header = [
        f"peftserve bench: {config.shape} on {machine}; dense matmul"
        f" {result.matmul_flops_per_s / 1e9:.1f} GFLOP/s; {result.seconds:.0f}s in all",
        f"main trace: {w.requests} requests over {w.num_adapters} adapters ({w.popularity} popularity,"
        f" alpha {w.alpha:g}), prompts U{list(w.prompt_len)}, outputs U{list(w.output_len)}, {rate},"
        " greedy, EOS ignored",
        f"adapter pools: {pools}",
        f"SLO: first token within {config.slo_ttft_s:g}s. Latencies count from each request's arrival."
        " 'other load': CPU cores other processes kept busy during the run (noise in the numbers);"
        " tok/CPU-s: generated tokens per CPU-second of the system's own processes (server and client,"
        " or the PEFT process), which other load barely moves.",
    ]
    busy = [r.other_cores for r in result.runs if r.other_cores is not None]
    threads = env.get("threads")
    if busy and max(busy) > 0.5 and isinstance(threads, int) and threads > 1:
        header.append(
            f"WARNING: other processes kept up to {max(busy):.1f} cores busy while each process ran"
            f" {threads} torch threads; parallel regions then wait for descheduled threads, and systems"
            " made of many small ops (PEFT) slow down most. Rerun with --threads 1 or on a quiet machine."
        )
    parts = ["\n".join(header), "Main (ratios: tok/s against peftserve)\n" + main_table(result)]
    if any(r.scenario == "adapters" for r in result.runs):
        sweep = f"Adapter count sweep ({config.sweep_requests} requests each; ratios against the base model)"
        parts.append(sweep + "\n" + adapters_table(result))
    if any(r.scenario == "load" for r in result.runs):
        parts.append("Load sweep (rates are fractions of peftserve's saturated req/s)\n" + load_table(result))
    parts.append("Targets of the issue\n" + targets_table(targets(result)))
    return "\n\n".join(parts)


def _json_ready(value: object) -> object:
    """JSON cannot hold inf: write it as the string "inf"; tuples become lists."""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def results_payload(result: SuiteResult) -> dict[str, object]:
    """Everything measured, raw per-request timings included."""
    runs = [
        {
            "scenario": r.scenario,
            "system": r.system,
            "num_adapters": r.num_adapters,
            "rate": r.rate,
            "pool": r.pool,
            "metrics": asdict(r.metrics),
            "useful_flops": r.useful_flops,
            "mfu": r.mfu(result.matmul_flops_per_s),
            "adapter_events": r.adapter_events,
            "other_cores": r.other_cores,
            "own_cpu_s": r.own_cpu_s,
            "tokens_per_cpu_s": r.tokens_per_cpu_s,
            "note": r.note,
            "requests": [asdict(rec) for rec in r.records],
        }
        for r in result.runs
    ]
    payload = {
        "benchmark": "peftserve bench (serving)",
        "config": asdict(result.config),
        "environment": result.environment,
        "matmul_flops_per_s": result.matmul_flops_per_s,
        "seconds": result.seconds,
        "pools": result.pools,
        "traces": result.traces,
        "runs": runs,
        "targets": [{**asdict(t), "met": t.met} for t in targets(result)],
    }
    return _json_ready(payload)  # type: ignore[return-value]


def write_results(result: SuiteResult, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / RESULTS_NAME
    path.write_text(json.dumps(results_payload(result), indent=1) + "\n")
    return path


def write_plot(result: SuiteResult, out_dir: Path) -> Path | None:
    """Throughput and TTFT against the number of adapters (top) and the arrival rate (bottom); None, and
    no file, when neither sweep ran (`--sweep-adapters --load-fractions` with no values)."""
    sweep = [r for r in result.runs if r.scenario == "adapters"]
    load = [r for r in result.runs if r.scenario == "load"]
    if not sweep and not load:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    styles = {"peftserve": "o-", "peft-batched": "s--", "base": "kx:", "peftserve-mixed": "D"}
    for system in ("peftserve", "peft-batched", "peftserve-mixed"):
        runs = sorted((r for r in sweep if r.system == system), key=lambda r: r.num_adapters or 0)
        if runs:
            x = [r.num_adapters for r in runs]
            axes[0][0].plot(x, [r.metrics.tokens_per_s for r in runs], styles[system], label=system)
            axes[0][1].plot(x, [r.metrics.ttft_p50 for r in runs], styles[system], label=f"{system} p50")
    for r in (r for r in sweep if r.system == "base"):
        axes[0][0].axhline(r.metrics.tokens_per_s, color="k", linestyle=":", label="base model (limit)")
        axes[0][1].axhline(r.metrics.ttft_p50 or 0, color="k", linestyle=":", label="base model p50")
    for system in ("peftserve", "base"):
        runs = sorted((r for r in load if r.system == system), key=lambda r: r.rate)
        if runs:
            x = [r.rate for r in runs]
            axes[1][0].plot(x, [r.metrics.tokens_per_s for r in runs], styles[system], label=system)
            axes[1][1].plot(x, [r.metrics.ttft_p50 for r in runs], styles[system], label=f"{system} p50")
            axes[1][1].plot(
                x, [r.metrics.ttft_p90 for r in runs], styles[system], alpha=0.4, label=f"{system} p90"
            )
    titles = (
        ("generated tok/s vs adapters", "number of adapters", "tok/s"),
        ("TTFT vs adapters", "number of adapters", "TTFT (s)"),
        ("generated tok/s vs arrival rate", "arrival rate (req/s)", "tok/s"),
        ("TTFT vs arrival rate", "arrival rate (req/s)", "TTFT (s)"),
    )
    for ax, (title, xlabel, ylabel) in zip(axes.flat, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
        if ax.has_data():
            ax.legend(fontsize=8)
    if sweep:
        axes[0][0].set_xscale("log")
        axes[0][1].set_xscale("log")
    env = result.environment
    fig.suptitle(
        f"peftserve bench, {result.config.shape} on {env.get('device')} ({env.get('cpus')} CPUs); "
        f"{result.config.sweep_requests} requests per point"
    )
    fig.tight_layout()
    path = out_dir / PLOT_NAME
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
