"""The client package imports with grpcio and protobuf only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


def test_client_imports_without_torch_or_transformers() -> None:
    code = (
        "import sys, peftserve_client; "
        "peftserve_client.Client('127.0.0.1:1').close(); "
        "bad = {'torch', 'transformers', 'peftserve'} & set(sys.modules); assert not bad, bad"
    )
    env = {**os.environ, "PYTHONPATH": str(CLIENT_DIR)}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=30)
    assert run.returncode == 0, run.stderr
