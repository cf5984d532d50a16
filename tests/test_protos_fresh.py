"""The committed generated code matches what scripts/gen_protos.py makes from protos/ today."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "client" / "peftserve_client" / "_proto"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (a dev dependency) regenerates the code")
    run = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    for fresh in sorted(tmp_path.glob("*.py*")):
        committed = COMMITTED / fresh.name
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_text() == fresh.read_text(), f"{committed.name} is stale: run `make protos`"


def test_generated_imports_are_relative() -> None:
    text = (COMMITTED / "peftserve_pb2_grpc.py").read_text()
    assert "from . import peftserve_pb2" in text and "from peftserve.v1" not in text
