"""Which try of a system the bench keeps: the least other load, then the fastest among equals."""

from __future__ import annotations

from types import SimpleNamespace

from peftserve.bench.suite import least_disturbed


def _try(other_cores: float | None, tokens_per_s: float) -> SimpleNamespace:
    return SimpleNamespace(other_cores=other_cores, metrics=SimpleNamespace(tokens_per_s=tokens_per_s))


def test_noise_below_the_resolution_does_not_pick_a_slower_try() -> None:
    tries = [_try(0.02, 207.9), _try(0.0, 228.0), _try(0.04, 253.5)]
    assert least_disturbed(tries) is tries[2]


def test_more_other_load_loses_whatever_its_speed() -> None:
    tries = [_try(1.4, 300.0), _try(0.3, 200.0), _try(None, 150.0)]
    assert least_disturbed(tries) is tries[2]  # unknown counts as none
    assert least_disturbed(tries[:2]) is tries[1]
