"""The bounded soak: one minute in `make test`, ten with `make soak` (PEFTSERVE_SOAK_S=600).

Asserts zero unexpected errors, every output equal to its version's expected output, the KV cache empty
at the end, and the server's RSS flat after warm-up: over the last 5 minutes of a 10-minute soak it
grows less than 2% (over the last third of a shorter one, still warming up, less than 8%).
PEFTSERVE_SOAK_REPORT names a file for the figures.
"""

from __future__ import annotations

import asyncio
import copy
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from peftserve.auth import KeyRing, Scope
from peftserve.bench.server import ServerProcess
from peftserve.model.default_model import ensure_default_model
from tests.adapters import peft_factory as pf
from tests.soak.driver import TENANTS, run_soak

pytestmark = pytest.mark.slow

DURATION_S = float(os.environ.get("PEFTSERVE_SOAK_S", "60"))
RSS_WINDOW_S = 300.0
"""The tail of a ten-minute soak whose RSS growth is bounded by 2% (a one-minute soak's last third: 8%)."""


def _variants(model_dir: Path, out: Path) -> list[Path]:
    """Adapters of every kind served, on the served model."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    makers = [
        lambda b, o: pf.make_lora_patterns(b, "llama", o),
        lambda b, o: pf.make_lora_layers(b, "llama", o),
        lambda b, o: pf.make_shira(b, "llama", o),
        lambda b, o: pf.make_prefix(b, o, projection=False),
        lambda b, o: pf.make_dora(b, "llama", o),
        lambda b, o: pf.make_ia3(b, "llama", o),
        lambda b, o: pf.make_loha(b, "llama", o),
        lambda b, o: pf.make_lokr(b, "llama", o),
        lambda b, o: pf.make_vera(b, "llama", o),
    ]
    return [make(copy.deepcopy(base), out / f"variant{i}") for i, make in enumerate(makers)]


def test_soak(tmp_path: Path) -> None:
    model_dir = ensure_default_model()
    variants = _variants(model_dir, tmp_path / "variants")
    ring, keys = KeyRing(), {}
    for tenant in TENANTS:
        ring, keys[tenant] = ring.add(tenant, [Scope.INFER, Scope.ADMIN])
    ring.save(tmp_path / "keys.json")
    server = ServerProcess.serve(
        ["--model", str(model_dir), "--dtype", "float32", "--store", str(tmp_path / "store"),
         "--keys-file", str(tmp_path / "keys.json"), "--adapter-slots", "4", "--max-running", "16",
         "--max-batched-tokens", "128", "--kv-cache-mb", "4", "--threads", "1"],
        log_path=tmp_path / "server.log",
    )  # fmt: skip
    try:
        address = server.wait_ready(240)
        report = asyncio.run(
            run_soak(address, keys, variants, DURATION_S, server.proc.pid, server.metrics_url or "")
        )
    finally:
        server.stop()
    if os.environ.get("PEFTSERVE_SOAK_REPORT"):
        Path(os.environ["PEFTSERVE_SOAK_REPORT"]).write_text(report.as_json())

    assert not report.errors and not report.mismatches, (dict(report.errors), report.mismatches[:5])
    assert report.kv_blocks_used_at_end == 0
    assert report.completed >= DURATION_S and report.cancelled > 0 and report.admin_calls > 0
    assert report.swaps >= DURATION_S  # at least one replace a second
    # A one-minute soak ends while the server's memory still settles (allocator arenas, caches): its last
    # third grew 1.6-5.2% over 8 runs on 2026-11-29, alike before and after that day's kernel change, so
    # it is bounded at 8% (a leak of ~3 MB/s); the ten-minute soak (make soak) bounds 5 minutes at 2%.
    tail, bound = (RSS_WINDOW_S, 0.02) if DURATION_S >= 2 * RSS_WINDOW_S else (DURATION_S / 3, 0.08)
    assert report.growth_after(report.seconds - tail) < bound, report.rss_mb
    assert server.proc.returncode == 0, server.tail()
