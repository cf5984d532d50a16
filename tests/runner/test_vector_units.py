"""Inductor's check of the CPU's vector sets runs once per machine, compiler and torch, not per process."""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch._inductor import config, cpu_vec_isa

from peftserve.runner import vector_units


class FakeSet:
    """A vector set whose build check passes or fails, counting how often it is checked."""

    def __init__(self, name: str, passes: bool = True) -> None:
        self.name, self.passes, self.checks = name, passes, 0

    def __bool__(self) -> bool:
        self.checks += 1
        return self.passes

    def __str__(self) -> str:
        return self.name


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A process that has not settled yet, inductor left to check, verdicts kept under tmp_path."""
    path = tmp_path / vector_units.VERDICTS
    monkeypatch.setattr(vector_units, "_verdicts_path", lambda: path)
    monkeypatch.setattr(vector_units, "_settled", False)
    with config.patch({"cpp.vec_isa_ok": None}):  # inductor's own way, undone after the test
        yield path


def _start(monkeypatch: pytest.MonkeyPatch, sets: list[FakeSet]) -> None:
    """A new process on a CPU reporting `sets`."""
    monkeypatch.setattr(vector_units, "_settled", False)
    config.cpp.vec_isa_ok = None
    monkeypatch.setattr(vector_units, "_candidates", lambda: sets)
    vector_units.trust_known_vector_units()


def test_a_verdict_is_kept_and_the_next_process_trusts_it(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = [FakeSet("avx512"), FakeSet("avx2")]
    _start(monkeypatch, sets)
    assert [s.checks for s in sets] == [1, 1] and config.cpp.vec_isa_ok is None  # checked, as inductor does
    assert list(json.loads(fresh.read_text()).values()) == [True]
    _start(monkeypatch, sets)
    assert [s.checks for s in sets] == [1, 1] and config.cpp.vec_isa_ok is True  # trusted, not checked
    vector_units.trust_known_vector_units()  # once per process
    assert [s.checks for s in sets] == [1, 1]


def test_a_set_that_failed_is_checked_again_in_every_process(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = [FakeSet("avx512", passes=False), FakeSet("avx2")]
    _start(monkeypatch, sets)
    _start(monkeypatch, sets)
    assert sets[0].checks == 2 and config.cpp.vec_isa_ok is None
    assert list(json.loads(fresh.read_text()).values()) == [False]


def test_another_torch_or_cpu_is_checked_again(fresh: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = [FakeSet("avx512"), FakeSet("avx2")]
    _start(monkeypatch, sets)
    monkeypatch.setattr(torch, "__version__", "0.0.0-another")
    _start(monkeypatch, sets)
    assert sets[0].checks == 2 and config.cpp.vec_isa_ok is None
    fewer = [FakeSet("avx2")]
    _start(monkeypatch, fewer)
    assert fewer[0].checks == 1 and len(json.loads(fresh.read_text())) == 3


def test_the_users_setting_and_a_damaged_file_are_respected(
    fresh: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sets = [FakeSet("avx2")]
    monkeypatch.setattr(vector_units, "_candidates", lambda: sets)
    config.cpp.vec_isa_ok = False  # as TORCHINDUCTOR_VEC_ISA_OK=0 sets it
    vector_units.trust_known_vector_units()
    assert config.cpp.vec_isa_ok is False and sets[0].checks == 0 and not fresh.exists()
    fresh.write_text("{not json")
    _start(monkeypatch, sets)
    assert sets[0].checks == 1 and list(json.loads(fresh.read_text()).values()) == [True]


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 only")
def test_the_sets_trusted_are_those_inductor_finds_good() -> None:
    """Where every set the CPU reports passes inductor's check, the sets trusted are the list inductor
    builds by checking (its table filtered by the CPU's flags, as _candidates filters it): nothing more."""
    with config.patch({"cpp.vec_isa_ok": None}):  # inductor checks in this thread, whatever was trusted
        candidates = vector_units._candidates()
        if not all(candidates):
            pytest.skip("a vector set fails inductor's check here: nothing is trusted")
        checked = cpu_vec_isa.valid_vec_isa_list.__wrapped__()  # not the process's cached list
    assert [str(s) for s in candidates] == [str(s) for s in checked]
