"""AdapterManager: versions, the default tenant, resolve and holds, slots (LRU, holds, pins), store scans."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from peftserve.adapters import AdapterManager, LowRankDelta, MultiAdapterLayer, load_adapter
from peftserve.adapters.forms import LowRankForm
from peftserve.engine.request import AdapterRef
from peftserve.engine.sequence import HeldVersion
from peftserve.errors import (
    AdapterNotFound,
    AdapterRejected,
    CapacityExceeded,
    FailedPrecondition,
    InvalidRequest,
)
from peftserve.store import AdapterStore
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model
from tests.store.helpers import stage


@pytest.fixture(scope="module")
def base() -> PreTrainedModel:
    return build_tiny_model("llama", seed=0)[0]


@pytest.fixture(scope="module")
def dirs(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "lora-a": pf.make_lora_patterns(base, "llama", root / "lora-a", seed=1),
        "lora-b": pf.make_lora_patterns(base, "llama", root / "lora-b", seed=7),
        "layers": pf.make_lora_layers(base, "llama", root / "layers"),
        "prefix": pf.make_prefix(base, root / "prefix", projection=True),
        "shira": pf.make_shira(base, "llama", root / "shira"),
    }


@pytest.fixture
def manager(base: PreTrainedModel, dirs: dict[str, Path]) -> AdapterManager:
    mgr = AdapterManager(copy.deepcopy(base), num_slots=4, device="cpu", dtype=torch.float32)
    for name, path in dirs.items():
        mgr.register(name, path)
    yield mgr
    mgr.close()


def test_register_makes_versions_of_the_default_tenant(
    manager: AdapterManager, dirs: dict[str, Path]
) -> None:
    assert manager.info("lora-a").adapter_id == "default/lora-a" and manager.info("lora-a").version == "v1"
    assert manager.info("lora-a").ranks == (2, 4, 6)
    assert manager.info("prefix").num_virtual_tokens == 5 and manager.info("shira").kind == "sparse"
    again = manager.register("default/lora-a", dirs["lora-b"])
    assert again.version == "v2" and manager.info("lora-a").version == "v2"
    assert manager.resolve((AdapterRef("lora-a"),)).deltas == (HeldVersion("default/lora-a@v2"),)
    assert manager.resolve((AdapterRef("default/lora-a@v1"),)).deltas == (HeldVersion("default/lora-a@v1"),)
    with pytest.raises(AdapterNotFound, match="'default/lora-a@v3' not found"):
        manager.resolve((AdapterRef("lora-a@v3"),))
    with pytest.raises(InvalidRequest):
        manager.register("Bad Name", dirs["lora-a"])


def test_resolve_checks_and_holds(manager: AdapterManager) -> None:
    assert manager.resolve(()).is_base
    prefix = manager.resolve((AdapterRef("prefix"),))
    assert prefix.prefix == "default/prefix@v1" and prefix.num_virtual_tokens == 5 and not prefix.deltas
    mix = manager.resolve((AdapterRef("lora-a", 0.5), AdapterRef("shira", 0.5)))
    assert [held.key for held in mix.deltas] == ["default/lora-a@v1", "default/shira@v1"]
    assert manager.registry.record("default/lora-a@v1").holds == 1
    manager.release_holds(mix.keys)
    manager.release_holds(prefix.keys)
    assert manager.registry.holds("default/lora-a") == 0
    with pytest.raises(AdapterNotFound, match="adapter 'default/nope' not found"):
        manager.resolve((AdapterRef("nope"),))
    with pytest.raises(InvalidRequest, match="mixture"):
        manager.resolve((AdapterRef("lora-a", 0.5), AdapterRef("prefix", 0.5)))
    with pytest.raises(InvalidRequest, match="twice"):
        manager.resolve((AdapterRef("lora-a"), AdapterRef("default/lora-a")))
    with pytest.raises(InvalidRequest, match="slots"):  # 4 slots, at most 2 pinned: mixtures of 2
        manager.resolve((AdapterRef("lora-a"), AdapterRef("lora-b"), AdapterRef("layers")))
    assert manager.registry.holds("default/lora-a") == 0  # failed resolves hold nothing


def test_slots_lru_holds_and_pins(base: PreTrainedModel, dirs: dict[str, Path]) -> None:
    manager = AdapterManager(copy.deepcopy(base), num_slots=2, device="cpu", dtype=torch.float32)
    for name in ("lora-a", "lora-b", "layers", "prefix"):
        manager.register(name, dirs[name])
    a = manager.acquire("lora-a")
    b = manager.acquire("lora-b")
    assert {a, b} == {0, 1}
    assert manager.acquire("lora-a") == a  # resident: same slot, second hold
    assert manager.acquire("prefix") is None  # prefix adapters take no slot
    with pytest.raises(CapacityExceeded):
        manager.acquire("layers")
    manager.release("lora-b")
    c = manager.acquire("layers")  # evicts lora-b, the only unheld one
    assert c == b and manager.slot_of("lora-b") is None
    assert (
        manager.layers["model.layers.0.self_attn.k_proj"].forms[LowRankForm].slots[b] is None
    )  # lora-b's modules cleared
    manager.release("lora-a")
    manager.release("lora-a")
    with pytest.raises(FailedPrecondition):
        manager.release("lora-a")
    manager.load_to_device("default/lora-a@v1", pin=True)
    assert manager.slots.pinned_slot_keys == {"default/lora-a@v1"}
    with pytest.raises(CapacityExceeded, match="pinned"):  # 2 slots: at most 1 pinned
        manager.load_to_device("default/lora-b@v1", pin=True)
    manager.release("layers")
    manager.acquire("lora-b")  # evicts 'layers', never the pinned lora-a
    assert manager.slot_of("lora-a") == a and manager.slot_of("layers") is None
    manager.drop_from_device("default/lora-a@v1")
    manager.apply_drops()
    assert manager.slot_of("lora-a") is None and not manager.slots.pinned_slot_keys
    manager.close()


def test_a_pin_never_outlives_residency_and_every_pinned_slot_is_reserved(
    base: PreTrainedModel, dirs: dict[str, Path]
) -> None:
    """The soak's finding: pinned, unloaded while held, pinned again, released, evicted, used again."""
    manager = AdapterManager(copy.deepcopy(base), num_slots=2, device="cpu", dtype=torch.float32)
    manager.register("lora-a", dirs["lora-a"])
    key = "default/lora-a@v1"

    def reserved_matches_pins() -> bool:  # every resident pinned adapter is reserved, nothing else
        slots = manager.slots
        return slots.pinned_slot_keys == {k for k in slots._pinned if slots.slot_of(k) is not None}

    manager.acquire("lora-a")
    manager.load_to_device(key, pin=True)
    manager.unload("default/lora-a")  # unpins now; it leaves when its last request does
    manager.apply_drops()
    manager.load_to_device(key, pin=True)  # pinned again before that: it stays
    manager.release("lora-a")
    assert manager.slot_of("lora-a") is not None and manager.slots.pinned_slot_keys == {key}
    assert reserved_matches_pins()

    manager.acquire("lora-a")
    manager.unload("default/lora-a")
    manager.apply_drops()
    manager.release("lora-a")  # unpinned while held: evicted at release, and no pin is left behind
    assert manager.slot_of("lora-a") is None and not manager.slots.pinned_slot_keys
    manager.acquire("lora-a")
    manager.release("lora-a")
    assert key in manager.slots._idle and reserved_matches_pins()  # idle, evictable, not pinned
    manager.close()


def test_superseded_version_stays_while_held_then_leaves_memory(
    manager: AdapterManager, dirs: dict[str, Path]
) -> None:
    old = manager.resolve((AdapterRef("lora-a"),))
    (key,) = old.keys
    manager.acquire(key)
    manager.register("lora-a", dirs["lora-b"])  # v2 becomes current
    assert manager.tier(key) == "device" and manager.resolve((AdapterRef("lora-a"),)).keys == (
        "default/lora-a@v2",
    )
    manager.release(key)
    manager.release_holds(old.keys)  # the last request on v1 ends
    manager.apply_drops()
    assert manager.tier(key) == "disk"
    assert manager.resolve((AdapterRef("lora-a@v1"),)).keys == (key,)  # still addressable by version


def test_unload_and_remove(manager: AdapterManager) -> None:
    held = manager.resolve((AdapterRef("lora-b"),))
    manager.acquire("default/lora-b@v1")
    manager.unload("default/lora-b")
    manager.apply_drops()
    assert manager.tier("default/lora-b@v1") == "device"  # in use: it stays
    manager.release("default/lora-b@v1")
    manager.release_holds(held.keys)
    manager.apply_drops()
    assert manager.tier("default/lora-b@v1") == "disk"
    held = manager.resolve((AdapterRef("layers"),))
    removal = manager.remove("default/layers")
    assert [r.key for r in removal.held] == ["default/layers@v1"] and not removal.freed
    with pytest.raises(AdapterNotFound):
        manager.resolve((AdapterRef("layers"),))
    assert manager.tier("default/layers@v1") == "host"  # the request holding it keeps it
    manager.release_holds(held.keys)
    assert manager.tier("default/layers@v1") == "disk"
    with pytest.raises(AdapterNotFound):
        manager.unload("default/layers")


def test_scan_is_lazy_verifies_hashes_and_skips_other_bases(
    base: PreTrainedModel, dirs: dict[str, Path], tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path)
    writer = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    for adapter_id, name in (("acme/a", "lora-a"), ("acme/b", "lora-b")):
        files = {p.name: p.read_bytes() for p in dirs[name].iterdir()}
        staged, entries = stage(store, files)
        store.commit(staged, writer.manifest_for(adapter_id, 1, writer.validate(staged), entries))
    manifest = tmp_path / "acme" / "b" / "v1" / "manifest.json"
    manifest.write_text(manifest.read_text().replace(writer.base.fingerprint, "llama-ffffffffffffffff"))

    manager = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    assert manager.scan(AdapterStore(tmp_path)) == 1
    assert manager.names("acme") == ["a"] and manager.tier("acme/a@v1") == "disk"
    held = manager.resolve((AdapterRef("acme/a"),))
    (adapter,) = [f.result() for f in manager.ensure_host(held.keys)]
    assert manager.host.stats.loads == 1 and manager.tier("acme/a@v1") == "host"
    expected = load_adapter(dirs["lora-a"])
    assert torch.equal(
        adapter.deltas["model.layers.0.mlp.up_proj"].b, expected.deltas["model.layers.0.mlp.up_proj"].b
    )

    damaged = tmp_path / "acme" / "a" / "v1" / "adapter_model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-4] + b"\0\0\0\0")
    fresh = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    fresh.scan(AdapterStore(tmp_path))
    with pytest.raises(AdapterRejected, match="sha256"):
        fresh.ensure_host(fresh.resolve((AdapterRef("acme/a"),)).keys)[0].result()
    for mgr in (writer, manager, fresh):
        mgr.close()


def test_wraps_projections_not_head_and_keeps_base(base: PreTrainedModel) -> None:
    model = copy.deepcopy(base)
    manager = AdapterManager(model, num_slots=1, device="cpu", dtype=torch.bfloat16)
    assert len(manager.layers) == 7 * base.config.num_hidden_layers
    assert not isinstance(model.lm_head, MultiAdapterLayer)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, MultiAdapterLayer)
    assert torch.equal(q.base_layer.weight, base.model.layers[0].self_attn.q_proj.weight)


def test_prefix_kv_in_model_dtype(
    manager: AdapterManager, base: PreTrainedModel, dirs: dict[str, Path]
) -> None:
    bf16 = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.bfloat16)
    bf16.register("p", dirs["prefix"])
    kv = bf16.prefix_kv("p")
    assert kv is not None and kv.dtype == torch.bfloat16 and kv.shape == (2, 2, 2, 5, 16)
    assert bf16.tier("default/p@v1") == "device"
    assert manager.prefix_kv("lora-a") is None
    bf16.close()


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
        assert isinstance(delta, LowRankDelta)
        torch.testing.assert_close(delta.b @ delta.a, expected, rtol=1e-6, atol=1e-7)
        seen += 1
    assert seen > 0


def test_a_version_folder_swapped_for_a_symlink_is_refused(
    base: PreTrainedModel, dirs: dict[str, Path], tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "store")
    manager = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    files = {p.name: p.read_bytes() for p in dirs["lora-a"].iterdir()}
    staged, entries = stage(store, files)
    stored = store.commit(staged, manager.manifest_for("acme/a", 1, manager.validate(staged), entries))
    manager.scan(store)
    stored.path.rename(tmp_path / "elsewhere")
    stored.path.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    held = manager.resolve((AdapterRef("acme/a"),))
    with pytest.raises(FailedPrecondition, match="symlink"):
        manager.ensure_host(held.keys)[0].result()
    manager.close()
