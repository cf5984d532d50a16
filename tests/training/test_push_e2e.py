"""`peftserve train --push` into a running server: the adapter answers right away, no restart."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftserve.bench.server import ServerProcess
from peftserve.cli import main
from peftserve_client import Client

from .conftest import TASK

pytestmark = pytest.mark.slow


def test_pushed_adapter_is_served_without_restart(tiny_llama_dir: Path, task_file: Path, tmp_path: Path):
    server = ServerProcess.serve(
        ["--model", str(tiny_llama_dir), "--dtype", "float32", "--store", str(tmp_path / "store"),
         "--threads", "1"]
    )  # fmt: skip
    try:
        address = server.wait_ready(240)
        train = ["train", "--base", str(tiny_llama_dir), "--data", str(task_file), "--no-progress"]
        options = ["--rank", "4", "--alpha", "8", "--max-steps", "80", "--lr", "1e-2", "--batch-size", "4"]
        assert main([*train, *options, "--push", address, "--adapter-id", "acme/facts"]) == 0
        with Client(address, timeout=60) as client:
            answers = [client.generate(p, adapter_id="acme/facts", max_new_tokens=16).text for p, _ in TASK]
    finally:
        server.stop()
    assert answers == [completion for _, completion in TASK]
