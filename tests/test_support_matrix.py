"""The README's support matrix is the one the family tests check, and it covers every served family."""

from __future__ import annotations

from pathlib import Path

from peftserve.model.families import FAMILIES
from tests.helpers.support_matrix import EXACT, KINDS, readme_block, render
from tests.helpers.tiny_models import ALL_FAMILIES

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_shows_the_matrix_the_tests_check() -> None:
    assert readme_block(README.read_text()) == render(), (
        "README.md's support matrix is stale: python -m tests.helpers.support_matrix --write README.md"
    )


def test_every_served_family_has_a_tiny_model_in_the_suite() -> None:
    assert sorted(ALL_FAMILIES) == sorted(FAMILIES)


def test_every_exact_cell_has_adapters_to_serve() -> None:
    for kind in KINDS:
        if any(kind.cell(f).verdict == EXACT for f in ALL_FAMILIES):
            assert kind.variants, kind.name
