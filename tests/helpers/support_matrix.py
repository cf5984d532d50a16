"""What every served family does with every adapter kind: the tests check each cell, the README shows it.

A cell is `exact` (tests/engine/test_families.py serves the kind's adapters in mixed batches and compares
them with PEFT's own forward), `refused` (the server rejects such adapters with INVALID_ARGUMENT and the
reason; tests/engine/test_families.py checks the message) or `n/a` (peft cannot make such an adapter for
the family; the same module checks that claim too). An adapter kind joins by adding an `AdapterKind` to
KINDS. Render the README's table with `python -m tests.helpers.support_matrix --write README.md`;
tests/test_support_matrix.py fails when the README's copy differs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from transformers import PreTrainedModel

from peftserve.model.families import FAMILIES
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import ALL_FAMILIES

Factory = Callable[[PreTrainedModel, str, Path], Path]
"""(tiny base model, family, output folder) -> a PEFT adapter folder made by peft itself."""

EXACT = "exact"
REFUSED = "refused"
NA = "n/a"


@dataclass(frozen=True)
class Cell:
    verdict: str
    """EXACT, REFUSED or NA."""
    reason: str = ""
    """Why, for REFUSED (a part of the server's message) and NA."""


@dataclass(frozen=True)
class AdapterKind:
    """An adapter kind as a column of the matrix: how to make its adapters, and where it does not apply."""

    name: str
    title: str
    variants: dict[str, Factory]
    """Adapter name -> factory; every variant of an exact cell is served in the family's mixed batch."""
    cell: Callable[[str], Cell]
    """family -> its cell."""


def _exact(_: str) -> Cell:
    return Cell(EXACT)


CONV1D_NA = "peft's SHiRA, LoHa and LoKr adapt nn.Linear (not transformers' Conv1D, GPT-2's projections)"
NO_EXPERTS = "no experts"
NO_V4_LAYOUT = "released with stacked experts: no transformers 4 layout for peft to convert"
V4_REASON = "an expert in transformers 4's layout"
"""Part of the server's message for LoRA on per-expert Linear modules (transformers 4 files)."""


def _linear_only(family: str) -> Cell:
    return Cell(NA, CONV1D_NA) if family == "gpt2" else Cell(EXACT)


def _experts(family: str) -> Cell:
    return Cell(EXACT) if FAMILIES[family].moe else Cell(NA, NO_EXPERTS)


def _experts_v4(family: str) -> Cell:
    if family in ("mixtral", "qwen3_moe"):
        return Cell(
            REFUSED,
            V4_REASON
            + " (per-expert Linear modules); load it with peft on transformers 5 and save it again: "
            "it becomes LoRA on the stacked experts, served exactly",
        )
    return Cell(NA, NO_V4_LAYOUT) if FAMILIES[family].moe else Cell(NA, NO_EXPERTS)


KINDS: tuple[AdapterKind, ...] = (
    AdapterKind(
        "lora",
        "LoRA",
        {"lora-patterns": pf.make_lora_patterns, "lora-layers": pf.make_lora_layers},
        _exact,
    ),
    AdapterKind("adalora", "AdaLoRA", {"adalora": pf.make_adalora}, _exact),
    AdapterKind(
        "prefix",
        "prefix tuning",
        {
            "prefix": lambda base, _, out: pf.make_prefix(base, out, projection=False),
            "prefix-proj": lambda base, _, out: pf.make_prefix(base, out, projection=True),
        },
        _exact,
    ),
    AdapterKind("shira", "SHiRA (sparse)", {"shira": pf.make_shira}, _linear_only),
    AdapterKind("dora", "DoRA", {"dora": pf.make_dora}, _exact),
    AdapterKind(
        "ia3",
        "IA³",
        {"ia3": pf.make_ia3, "ia3-other": lambda base, family, out: pf.make_ia3(base, family, out, 11, True)},
        _exact,
    ),
    AdapterKind("loha", "LoHa", {"loha": pf.make_loha}, _linear_only),
    AdapterKind("lokr", "LoKr", {"lokr": pf.make_lokr}, _linear_only),
    AdapterKind("vera", "VeRA", {"vera": pf.make_vera}, _exact),
    AdapterKind("experts", "LoRA on experts and router", {"experts": pf.make_expert_lora}, _experts),
    AdapterKind("experts-v4", "LoRA on experts, transformers 4 files", {}, _experts_v4),
)
"""The columns, in order. A new kind: its factories and its cells."""


def cells(verdict: str) -> list[tuple[str, AdapterKind]]:
    """Every (family, kind) whose cell has this verdict."""
    return [(f, k) for f in ALL_FAMILIES for k in KINDS if k.cell(f).verdict == verdict]


def render() -> str:
    """The matrix as a markdown table (families as rows, kinds as columns) and its footnotes."""
    notes: list[str] = []

    def show(cell: Cell) -> str:
        if cell.verdict == EXACT:
            return "exact"
        if cell.reason not in notes:
            notes.append(cell.reason)
        return f"{cell.verdict} [{notes.index(cell.reason) + 1}]"

    header = ["family (`model_type`)", "beyond a Llama block", *(k.title for k in KINDS)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for family in FAMILIES.values():
        traits = ", ".join(family.traits) or "-"
        row = [
            f"{family.name} (`{family.model_type}`)",
            traits,
            *(show(k.cell(family.model_type)) for k in KINDS),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- [{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


START = "<!-- support-matrix:start (python -m tests.helpers.support_matrix --write README.md) -->"
END = "<!-- support-matrix:end -->"


def readme_block(text: str) -> str:
    """The matrix part of a README between START and END (ValueError if the markers are missing)."""
    start, end = text.index(START) + len(START), text.index(END)
    return text[start:end].strip("\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the support matrix, or write it into a README.")
    parser.add_argument("--write", type=Path, help="README to update between the markers")
    args = parser.parse_args()
    if args.write is None:
        print(render())
        return
    text = args.write.read_text()
    start, end = text.index(START) + len(START), text.index(END)
    args.write.write_text(text[:start] + "\n" + render() + "\n" + text[end:])


if __name__ == "__main__":
    main()
