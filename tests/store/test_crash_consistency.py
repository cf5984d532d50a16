"""Crash consistency: a writer SIGKILLed at random points leaves every acknowledged version intact
(sha256 of every file), no partial version, and nothing in .tmp/ once the store is opened again."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from peftserve.store import AdapterStore
from peftserve.store.files import sha256_hex

TRIALS = 24
REPO = Path(__file__).resolve().parents[2]

Version = tuple[str, str]  # (id, version)


def run_writer(root: Path, seed: int, rng: random.Random) -> list[str]:
    """Start a writer, let it work for a random time, SIGKILL it; its complete output lines."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.store.crash_writer", str(root), str(seed)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"READY\n"
    time.sleep(rng.uniform(0.0, 0.35))
    proc.send_signal(signal.SIGKILL)
    out = proc.stdout.read()  # the same buffered reader as readline: nothing it read ahead is lost
    assert proc.wait(timeout=30) == -signal.SIGKILL
    return out.decode().split("\n")[:-1]  # the last piece may be cut mid-line


def test_sigkill_during_uploads_leaves_whole_versions_or_nothing(tmp_path: Path) -> None:
    rng = random.Random(1234)
    acknowledged: dict[Version, dict[str, str]] = {}
    for trial in range(TRIALS):
        uncertain: set[str] = set()  # ids whose delete was cut off: their versions may be gone
        for line in run_writer(tmp_path, trial, rng):
            kind, adapter_id, *rest = line.split(" ")
            if kind == "ACK":
                acknowledged[(adapter_id, rest[0])] = dict(item.split("=") for item in rest[1:])
            elif kind == "DELETING":
                uncertain.add(adapter_id)
            elif kind == "DELETED":
                uncertain.discard(adapter_id)
                acknowledged = {k: v for k, v in acknowledged.items() if k[0] != adapter_id}

        store = AdapterStore(tmp_path)  # what a restarted server sees
        assert os.listdir(tmp_path / ".tmp") == [] and os.listdir(tmp_path / ".trash") == []
        present = {(s.manifest.adapter_id, s.manifest.version): s for s in store.scan()}
        for version, hashes in list(acknowledged.items()):
            if version not in present and version[0] in uncertain:
                del acknowledged[version]  # the cut-off delete took it: allowed
                continue
            assert version in present, f"trial {trial}: acknowledged {version} is missing"
            assert {f.name: f.sha256 for f in present[version].manifest.files} == hashes
        for version, stored in present.items():  # acknowledged or not: never partial
            on_disk = sorted(p.name for p in stored.path.iterdir())
            assert on_disk == sorted([f.name for f in stored.manifest.files] + ["manifest.json"]), version
            for entry in stored.manifest.files:
                assert sha256_hex((stored.path / entry.name).read_bytes()) == entry.sha256, version
    assert len(acknowledged) > 0
