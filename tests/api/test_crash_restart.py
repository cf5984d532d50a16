"""A server SIGKILLed during uploads and replaces, several times: at every restart the store holds every
acknowledged version whole (each file's sha256 as uploaded), nothing half-written, and serves them."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from pathlib import Path

import pytest

from peftserve.bench.server import ServerProcess
from peftserve.store import AdapterStore
from peftserve_client import Client, PeftServeError
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

KILLS = 3
UPLOADERS = 2
IDS = ("crash/a", "crash/b", "crash/c")


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def _upload_until_killed(
    address: str, variants: list[Path], seed: int, acked: dict, lock: threading.Lock
) -> None:
    rng = random.Random(seed)
    with Client(address, timeout=30) as client:
        while True:
            adapter_id, variant = rng.choice(IDS), rng.choice(variants)
            try:
                manifest = client.upload_adapter(variant, adapter_id)
            except PeftServeError:
                return  # the server is gone (UNAVAILABLE), or went mid-upload
            with lock:
                acked[(manifest.adapter_id, manifest.version)] = _hashes(variant)


def test_sigkill_during_uploads_and_replaces_keeps_the_store_whole(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    base, _ = build_tiny_model("llama")
    variants = [pf.make_lora_layers(base, "llama", tmp_path / f"variant{i}", seed=20 + i) for i in range(3)]
    store = tmp_path / "store"
    serve_args = ["--model", str(tiny_llama_dir), "--dtype", "float32", "--store", str(store),
                  "--adapter-versions-kept", "1000"]  # fmt: skip
    acked: dict[tuple[str, str], dict[str, str]] = {}
    lock = threading.Lock()
    rng = random.Random(5)
    interrupted = 0

    for kill in range(KILLS):
        server = ServerProcess.serve(serve_args)
        address = server.wait_ready(240)
        threads = [
            threading.Thread(
                target=_upload_until_killed, args=(address, variants, 100 * kill + i, acked, lock)
            )
            for i in range(UPLOADERS)
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(1.0, 3.0))
        server.proc.kill()  # SIGKILL: no drain, no cleanup
        server.proc.wait(timeout=30)
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads)
        interrupted += any((store / ".tmp").iterdir())  # an upload was cut mid-way (cleaned at restart)

    assert acked and interrupted, (
        f"{len(acked)} uploads acknowledged, {interrupted} cut mid-way: too few to prove much"
    )
    server = ServerProcess.serve(serve_args)
    try:
        address = server.wait_ready(240)
        with Client(address, timeout=60) as client:
            listed = {s.adapter_id: s.manifest.version for s in client.iter_adapters()}
            served = {
                adapter_id: client.generate("hi", adapter_id=adapter_id, max_new_tokens=2).finish_reason
                for adapter_id in listed
            }
    finally:
        server.stop()

    on_disk = {
        (s.manifest.adapter_id, s.manifest.version): s for s in AdapterStore(store, clean=False).scan()
    }
    for version, hashes in acked.items():
        assert version in on_disk, f"acknowledged {version} is gone"
        stored = on_disk[version]
        assert {f.name: f.sha256 for f in stored.manifest.files} == hashes
        assert _hashes(stored.path) == {**hashes, "manifest.json": _hashes(stored.path)["manifest.json"]}
    for stored in on_disk.values():  # unacknowledged versions are whole too (or absent)
        assert {f.name: f.sha256 for f in stored.manifest.files}.items() <= _hashes(stored.path).items()
    assert list((store / ".tmp").iterdir()) == [] and list((store / ".trash").iterdir()) == []
    newest = {}
    for adapter_id, version in on_disk:
        newest[adapter_id] = max(newest.get(adapter_id, version), version, key=lambda v: int(v[1:]))
    assert listed == newest and all(reason is not None for reason in served.values())
