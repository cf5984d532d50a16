"""LLMEngine.create with a store and `--adapter`: manifests are read lazily, NAME is the default tenant's."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from peftserve.adapters import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.async_engine import AsyncEngine
from peftserve.engine.engine import LLMEngine
from peftserve.errors import InvalidRequest
from peftserve.store import AdapterStore
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model
from tests.store.helpers import stage


def test_create_scans_the_store_and_registers_adapters(tiny_llama_dir: Path, tmp_path: Path) -> None:
    base, _ = build_tiny_model("llama")
    lora = pf.make_lora_layers(base, "llama", tmp_path / "lora")
    store = AdapterStore(tmp_path / "store")
    writer = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    files = {p.name: p.read_bytes() for p in lora.iterdir()}
    staged, entries = stage(store, files)
    store.commit(staged, writer.manifest_for("acme/stored", 1, writer.validate(staged), entries))
    writer.close()
    (tmp_path / "store" / ".tmp" / "upload-leftover").mkdir()  # a crashed upload

    config = EngineConfig(
        model=str(tiny_llama_dir),
        dtype="float32",
        kv_cache_mb=1,
        max_running=6,
        store=str(tmp_path / "store"),
        adapters=(("mine", str(lora)), ("acme/explicit", str(lora))),
    )
    front = AsyncEngine(LLMEngine.create(config))
    try:
        manager = front.engine.adapters.manager
        assert manager.num_slots == 6  # no --adapter-slots: one per running request
        assert manager.names("default") == ["mine"] and manager.names("acme") == ["explicit", "stored"]
        assert manager.tier("acme/stored@v1") == "disk"  # read from its manifest, loaded on first use
        assert manager.tier("default/mine@v1") == "host"  # registered folders are validated at start
        assert front.admin is not None and front.admin.store.root == (tmp_path / "store").resolve()
        assert front.adapter_metrics is manager.metrics
        assert not (tmp_path / "store" / ".tmp" / "upload-leftover").exists()
    finally:
        front.shutdown()


def test_adapter_slots_default_to_max_running_and_must_be_positive() -> None:
    assert EngineConfig(max_running=48).slots == 48
    assert EngineConfig(max_running=48, adapter_slots=8).slots == 8
    with pytest.raises(InvalidRequest, match="adapter_slots must be > 0, got 0"):
        EngineConfig(adapter_slots=0)
