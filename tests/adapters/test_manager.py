"""AdapterManager: ids, store scan, resolve, slots (LRU, holds), normalized deltas vs peft's own."""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from peftserve.adapters import AdapterManager, LoraDelta, MultiAdapterLayer, load_adapter
from peftserve.engine.request import AdapterRef
from peftserve.errors import AdapterNotFound, CapacityExceeded, FailedPrecondition, InvalidRequest
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model


@pytest.fixture(scope="module")
def base() -> PreTrainedModel:
    return build_tiny_model("llama", seed=0)[0]


@pytest.fixture(scope="module")
def store(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """<root>/acme/lora-a, acme/lora-b, acme/layers, acme/prefix, globex/shira/v1 and two bad dirs."""
    root = tmp_path_factory.mktemp("store")
    pf.make_lora_patterns(base, "llama", root / "acme" / "lora-a", seed=1)
    pf.make_lora_patterns(base, "llama", root / "acme" / "lora-b", seed=7)
    pf.make_lora_layers(base, "llama", root / "acme" / "layers")
    pf.make_prefix(base, root / "acme" / "prefix", projection=True)
    pf.make_shira(base, "llama", root / "globex" / "shira" / "v1")
    shutil.copytree(root / "acme" / "lora-a", root / "acme" / "Bad_Name")
    (root / "acme" / "broken").mkdir()
    (root / "acme" / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    return root


@pytest.fixture
def manager(base: PreTrainedModel, store: Path) -> AdapterManager:
    mgr = AdapterManager(copy.deepcopy(base), num_slots=2, device="cpu", dtype=torch.float32)
    mgr.scan_store(store)
    return mgr


def test_scan_store_registers_good_dirs_and_skips_bad(manager: AdapterManager) -> None:
    ids = [info.adapter_id for info in manager.registered()]
    assert ids == ["acme/layers", "acme/lora-a", "acme/lora-b", "acme/prefix", "globex/shira/v1"]
    assert manager.info("globex/shira/v1").kind == "sparse" and manager.info("globex/shira/v1").nnz > 0
    assert manager.info("acme/prefix").num_virtual_tokens == 5
    assert manager.info("acme/lora-a").ranks == (2, 4, 6)


def test_scan_store_logs_skipped(base: PreTrainedModel, store: Path, caplog) -> None:
    mgr = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    with caplog.at_level(logging.WARNING):
        mgr.scan_store(store)
    assert "Bad_Name" in caplog.text and "broken" in caplog.text


@pytest.mark.parametrize("bad_id", ["", "UPPER", "a//b", "../x", ".hidden", "a/" + "x" * 65, "sp ace"])
def test_invalid_ids(manager: AdapterManager, store: Path, bad_id: str) -> None:
    with pytest.raises(InvalidRequest):
        manager.register(bad_id, store / "acme" / "lora-a")


def test_duplicate_registration(manager: AdapterManager, store: Path) -> None:
    with pytest.raises(InvalidRequest, match="already registered"):
        manager.register("acme/lora-a", store / "acme" / "lora-a")


def test_resolve(manager: AdapterManager) -> None:
    assert manager.resolve(()).is_base
    single = manager.resolve((AdapterRef("acme/lora-a"),))
    assert single.deltas == (AdapterRef("acme/lora-a"),) and single.prefix is None
    prefix = manager.resolve((AdapterRef("acme/prefix"),))
    assert prefix.prefix == "acme/prefix" and prefix.num_virtual_tokens == 5 and not prefix.deltas
    mix = (AdapterRef("acme/lora-a", 0.5), AdapterRef("globex/shira/v1", 0.5))
    assert manager.resolve(mix).deltas == mix
    with pytest.raises(AdapterNotFound):
        manager.resolve((AdapterRef("acme/nope"),))
    with pytest.raises(InvalidRequest, match="mixture"):
        manager.resolve((AdapterRef("acme/lora-a", 0.5), AdapterRef("acme/prefix", 0.5)))
    with pytest.raises(InvalidRequest, match="not finite"):
        manager.resolve((AdapterRef("acme/lora-a", float("inf")),))
    with pytest.raises(InvalidRequest, match="twice"):
        manager.resolve((AdapterRef("acme/lora-a"), AdapterRef("acme/lora-a")))
    with pytest.raises(InvalidRequest, match="slots"):  # 3 distinct adapters, 2 slots
        manager.resolve((AdapterRef("acme/lora-a"), AdapterRef("acme/lora-b"), AdapterRef("acme/layers")))


def test_slots_lru_and_holds(manager: AdapterManager) -> None:
    a = manager.acquire("acme/lora-a")
    b = manager.acquire("acme/lora-b")
    assert {a, b} == {0, 1}
    assert manager.acquire("acme/lora-a") == a  # resident: same slot, second hold
    assert manager.acquire("acme/prefix") is None  # prefix adapters take no slot
    with pytest.raises(CapacityExceeded):
        manager.acquire("acme/layers")
    manager.release("acme/lora-b")
    c = manager.acquire("acme/layers")  # evicts lora-b, the only unheld one
    assert c == b and manager.slot_of("acme/lora-b") is None
    layer = manager.layers["model.layers.0.self_attn.k_proj"]
    assert layer.lora_slots[b] is None  # lora-b's modules were cleared; 'layers' does not target k_proj
    manager.release("acme/lora-a")
    manager.release("acme/lora-a")
    with pytest.raises(FailedPrecondition):
        manager.release("acme/lora-a")
    with pytest.raises(FailedPrecondition):
        manager.unregister("acme/layers")  # still held
    manager.release("acme/layers")
    manager.unregister("acme/layers")
    with pytest.raises(AdapterNotFound):
        manager.acquire("acme/layers")


def test_wraps_projections_not_head_and_keeps_base(base: PreTrainedModel) -> None:
    model = copy.deepcopy(base)
    manager = AdapterManager(model, num_slots=1, device="cpu", dtype=torch.bfloat16)
    assert len(manager.layers) == 7 * base.config.num_hidden_layers
    assert not isinstance(model.lm_head, MultiAdapterLayer)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MultiAdapterLayer)
    assert q.base_layer.weight is base.model.layers[0].self_attn.q_proj.weight or torch.equal(
        q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight
    )


def test_prefix_kv_in_model_dtype(manager: AdapterManager, base: PreTrainedModel) -> None:
    bf16 = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.bfloat16)
    bf16.register("p", Path(manager.info("acme/prefix").path))
    kv = bf16.prefix_kv("p")
    assert kv is not None and kv.dtype == torch.bfloat16 and kv.shape == (2, 2, 2, 5, 16)
    assert manager.prefix_kv("acme/lora-a") is None


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_normalized_delta_equals_peft_delta_weight(family: str, kind: str, tmp_path: Path) -> None:
    """B @ A after normalization is peft's own get_delta_weight (scaling incl. AdaLoRA's 1e-5), per module."""
    model, _ = build_tiny_model(family, seed=0)
    make = pf.make_lora_patterns if kind == "lora" else pf.make_adalora
    adapter_dir = make(model, family, tmp_path / kind)
    normalized = load_adapter(adapter_dir)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).eval()
    seen = 0
    for name, module in peft_model.named_modules():
        if not (hasattr(module, "get_delta_weight") and hasattr(module, "base_layer")):
            continue
        path = name[len("base_model.model.") :]
        with torch.no_grad():
            expected = module.get_delta_weight("default")
        if family == "gpt2":
            expected = expected.T  # Conv1D deltas come back [in, out]
        delta = normalized.deltas.get(path)
        if delta is None:  # AdaLoRA module pruned to rank 0
            assert kind == "adalora" and not expected.any()
            continue
        assert isinstance(delta, LoraDelta)
        torch.testing.assert_close(delta.b @ delta.a, expected, rtol=1e-6, atol=1e-7)
        seen += 1
    assert seen > 0
