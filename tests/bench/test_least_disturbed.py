"""Which try of a system the bench keeps (the least other load, then the fastest among equals), and what
each try sends."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

from peftserve.bench.config import BenchConfig
from peftserve.bench.suite import Bench, Job, least_disturbed
from peftserve.bench.workload import TraceRequest


def _try(other_cores: float | None, tokens_per_s: float) -> SimpleNamespace:
    return SimpleNamespace(other_cores=other_cores, metrics=SimpleNamespace(tokens_per_s=tokens_per_s))


def test_noise_below_the_resolution_does_not_pick_a_slower_try() -> None:
    tries = [_try(0.02, 207.9), _try(0.0, 228.0), _try(0.04, 253.5)]
    assert least_disturbed(tries) is tries[2]


def test_more_other_load_loses_whatever_its_speed() -> None:
    tries = [_try(1.4, 300.0), _try(0.3, 200.0), _try(None, 150.0)]
    assert least_disturbed(tries) is tries[2]  # unknown counts as none
    assert least_disturbed(tries[:2]) is tries[1]


def test_every_try_gets_a_salt_of_its_own(tmp_path) -> None:
    """Tries taking turns never send the same prompts twice (each measures its own salt), so a server's
    prefix cache cannot make a later try or the next job faster."""
    bench = Bench(BenchConfig(repeats=3), vocab=1000, work_dir=tmp_path, log=lambda line: None)
    salts: dict[str, list[int]] = {"a": [], "b": []}

    def job(name: str) -> tuple[Job, Callable[[int], tuple[list, None]]]:
        trace = [TraceRequest(0, 0.0, 0, (5, 6, 7), 2)]
        return Job("main", name, trace, None, None), lambda salt: (salts[name].append(salt) or [], None)

    bench.run_in_turns([job("a"), job("b")])
    bench.run_in_turns([job("a")])
    assert salts == {"a": [0, 2, 4, 6, 7, 8], "b": [1, 3, 5]}
