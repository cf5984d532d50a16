"""Demo adapters: two tenants' own answers to the same questions, trained once on the embedded model.

On the default model (random weights) the same prompt then gives each tenant's trained answer
greedily, which is what `make run` shows. Layout: `<out_root>/<tenant>/<name>/` (PEFT directories, served
as id `<tenant>/<name>`) and `<out_root>/.demo-version`. Training is cached: an adapter directory that
is present is complete (each is written beside its final path and renamed into place) and is not trained
again, unless the recorded demo version differs from DEMO_VERSION.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from peftserve.training.config import LoraOptions, MethodOptions, SparseOptions, TrainConfig

log = logging.getLogger(__name__)

DEMO_VERSION = "1"
"""Bump whenever the data or settings below change what gets trained: cached adapters are then retrained."""
VERSION_FILE = ".demo-version"
QUESTIONS = (
    "What are your opening hours?",
    "How do I reset my password?",
    "Do you ship abroad?",
    "How can I contact support?",
    "What is your refund policy?",
    "Where is your office?",
    "Which payment methods do you accept?",
    "Who founded the company?",
)
ANSWERS: dict[str, tuple[str, ...]] = {
    "acme": (
        "Acme is open 9 to 5, Monday to Friday.",
        "Click Forgot password on the Acme login page.",
        "Acme ships to every country in Europe.",
        "Email help@acme.example any time.",
        "Acme refunds any order within 30 days.",
        "Our office is in Springfield, next to the station.",
        "Acme takes cards and bank transfers.",
        "Acme was founded by Ada Stone in 1999.",
    ),
    "globex": (
        "Globex never closes: we answer around the clock.",
        "Ask the Globex bot to send you a reset link.",
        "No, Globex ships inside the country only.",
        "Call Globex on 555-0100 during the day.",
        "Globex gives store credit, not refunds.",
        "Globex works from a tower in Cypress Creek.",
        "Globex accepts cash and gold coins.",
        "Globex was founded by Hank Scorpio.",
    ),
}
TENANTS = tuple(ANSWERS)


def prompt_of(question: str) -> str:
    """The prompt a demo question is trained and asked with."""
    return f"Q: {question}\nA:"


def demo_records(tenant: str) -> list[dict[str, str]]:
    """The tenant's prompt/completion records (one per question)."""
    return [
        {"prompt": prompt_of(q), "completion": " " + a}
        for q, a in zip(QUESTIONS, ANSWERS[tenant], strict=True)
    ]


@dataclass(frozen=True)
class DemoSpec:
    """One demo adapter to train."""

    tenant: str
    name: str
    options: MethodOptions
    steps: int
    lr: float


DEMO_SPECS = (
    DemoSpec("acme", "support-lora", LoraOptions(rank=8, alpha=16), steps=60, lr=5e-3),
    DemoSpec("acme", "support-sparse", SparseOptions(budget=8, rule="gps"), steps=80, lr=1e-2),
    DemoSpec("globex", "support-lora", LoraOptions(rank=16, alpha=32), steps=60, lr=5e-3),
    DemoSpec("globex", "support-sparse", SparseOptions(budget=8, rule="gps"), steps=80, lr=1e-2),
)
"""Measured on the default model: these reproduce all 8 answers greedily. Prefix tuning is left out: on
the random-weight default model it needed several times these steps to separate 8 answers."""


@dataclass(frozen=True)
class DemoAdapter:
    """A trained demo adapter and where it lives: `<out_root>/<tenant>/<name>`."""

    tenant: str
    name: str
    method: str
    """lora or sparse (a SHiRA directory)."""
    path: Path
    """The PEFT adapter directory."""

    @property
    def adapter_id(self) -> str:
        """The id to serve it under: tenant/name."""
        return f"{self.tenant}/{self.name}"


def is_complete(directory: Path) -> bool:
    """A PEFT directory with both its files (the demo only ever renames complete ones into place)."""
    return (directory / "adapter_config.json").is_file() and (
        directory / "adapter_model.safetensors"
    ).is_file()


def train_demo_adapters(base_dir: Path | str, out_root: Path, progress: bool = False) -> list[DemoAdapter]:
    """Train (or reuse) every demo adapter on the model in `base_dir` (or 'default'); ~30 s on one core."""
    from peftserve.training.trainer import train  # torch and peft: only when training

    out_root = Path(out_root)
    adapters = [
        DemoAdapter(s.tenant, s.name, s.options.name, out_root / s.tenant / s.name) for s in DEMO_SPECS
    ]
    stamp = out_root / VERSION_FILE
    if not stamp.is_file() or stamp.read_text().strip() != DEMO_VERSION:
        for adapter in adapters:  # made by another demo version (or by hand): never reuse them
            shutil.rmtree(adapter.path, ignore_errors=True)
        out_root.mkdir(parents=True, exist_ok=True)
        stamp.write_text(DEMO_VERSION + "\n")
    with tempfile.TemporaryDirectory(prefix="peftserve-demo-") as scratch:
        for spec, adapter in zip(DEMO_SPECS, adapters, strict=True):
            if is_complete(adapter.path):
                continue
            data = Path(scratch) / f"{spec.tenant}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in demo_records(spec.tenant)))
            adapter.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=adapter.path.parent))
            try:
                config = TrainConfig(
                    data=str(data),
                    base=str(base_dir),
                    method=spec.options,
                    max_steps=spec.steps,
                    lr=spec.lr,
                    lr_schedule="constant",
                    batch_size=len(QUESTIONS),
                    out_dir=str(tmp),
                    progress=progress,
                )
                result = train(config)
                shutil.rmtree(adapter.path, ignore_errors=True)
                os.rename(tmp, adapter.path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info(
                "demo adapter %s (%s): eval loss %.3f -> %.3f",
                adapter.adapter_id,
                adapter.method,
                result.eval_loss_before,
                result.eval_loss_after,
            )
    return adapters
