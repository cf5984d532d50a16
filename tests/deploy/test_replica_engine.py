"""A replica's engine as `open_engine` builds it (no Ray cluster needed)."""

from __future__ import annotations

import gc
from pathlib import Path

from peftserve.config import EngineConfig
from peftserve.deploy.replica import open_engine


def test_a_replicas_engine_freezes_the_startup_heap(tiny_llama_dir: Path) -> None:
    """Full garbage collections in a replica skip what its start-up built, as in one server: a collection
    of the whole heap holds the GIL long enough to stall the engine thread and the replica's loop."""
    gc.unfreeze()
    front, sync = open_engine(EngineConfig(model=str(tiny_llama_dir), dtype="float32", kv_cache_mb=1))
    try:
        assert sync is None  # no store
        assert gc.get_freeze_count() > 10_000  # the modules imported and the model, at least
    finally:
        front.shutdown()
        gc.unfreeze()
