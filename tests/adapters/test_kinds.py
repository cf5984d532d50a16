"""The kind registry and what each kind's manifest says: its forms, slot bytes, shared bytes and limit."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from peftserve.adapters import KINDS, AdapterManager
from peftserve.adapters.kinds import FORMS, kind_for
from peftserve.engine.request import AdapterRef
from peftserve.store import AdapterStore
from peftserve.store.manifest import manifest_from_json, manifest_to_json
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model
from tests.store.helpers import stage

FLOAT = 4  # bytes of a float32 entry


@pytest.fixture(scope="module")
def base() -> PreTrainedModel:
    return build_tiny_model("llama", seed=0)[0]


@pytest.fixture(scope="module")
def dirs(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    made = pf.make_all(base, "llama", root)
    made["vera-twin"] = pf.make_vera(base, "llama", root / "vera-twin", seed=21)  # same projections as vera
    made["prefix"] = pf.make_prefix(base, root / "prefix", projection=False)
    return made


def test_one_line_per_kind_and_every_form_used() -> None:
    assert len({k.name for k in KINDS}) == len(KINDS)
    assert set(FORMS) == {form for kind in KINDS for form in kind.forms}
    assert kind_for({"peft_type": "LORA", "use_dora": True}).name == "dora"
    assert kind_for({"peft_type": "LORA"}).name == "lora"
    assert kind_for({"peft_type": "BOFT"}) is None


def test_manifests_say_how_each_kind_is_served(base: PreTrainedModel, dirs: dict[str, Path]) -> None:
    manager = AdapterManager(copy.deepcopy(base), num_slots=len(dirs), device="cpu", dtype=torch.float32)
    info = {name: manager.register(name, path) for name, path in dirs.items()}
    layers, modules = base.config.num_hidden_layers, 7
    per_layer = {
        "q": (64, 64),
        "k": (32, 64),
        "v": (32, 64),
        "o": (64, 64),
        "gate": (128, 64),
        "up": (128, 64),
    }
    per_layer["down"] = (64, 128)
    outs = sum(o for o, _ in per_layer.values())

    dora = info["dora"]
    assert (dora.kind, dora.peft_type) == ("dora", "LORA")
    assert dict(dora.forms) == {"low_rank": layers * modules, "output_scale": layers * modules}
    assert dora.ranks == (2, 4, 6) and dora.needs_max_rank == 6
    # a LoRA's A and B plus one scale per output feature
    lora_bytes = info["lora-patterns"].device_bytes
    assert dora.device_bytes == lora_bytes + layers * outs * FLOAT

    ia3 = info["ia3"]
    assert dict(ia3.forms) == {"input_scale": layers, "output_scale": 2 * layers}  # down_proj; k, v
    assert ia3.needs_max_rank == 0 and ia3.device_bytes == layers * (128 + 32 + 32) * FLOAT

    loha = info["loha"]
    assert dict(loha.forms) == {"dense": 3, "low_rank": 11}  # r=8 modules dense, r=4 ones rank 16
    assert loha.ranks == (16,) and loha.needs_max_rank == -(-64 * 128 // (64 + 128))  # the dense down_proj

    lokr = info["lokr"]
    assert dict(lokr.forms) == {"kronecker": layers * modules} and lokr.needs_max_rank == 1

    vera = info["vera"]
    assert dict(vera.forms) == {"projected": layers * modules} and vera.ranks == (8,)
    assert vera.device_bytes == layers * (outs + modules * 8) * FLOAT  # the vectors only
    assert vera.shared_bytes == (8 * 128 + 128 * 8) * FLOAT  # A [r, max_in], B [max_out, r]

    prefix = info["prefix"]
    assert prefix.forms == () and prefix.device_bytes == layers * 2 * 2 * 5 * 16 * FLOAT

    assert manifest_from_json(manifest_to_json(loha)) == loha  # the new fields survive the store
    manager.close()


def test_shared_projections_are_on_the_device_once(base: PreTrainedModel, dirs: dict[str, Path]) -> None:
    manager = AdapterManager(copy.deepcopy(base), num_slots=4, device="cpu", dtype=torch.float32)
    for name in ("vera", "vera-twin", "vera-other"):
        manager.register(name, dirs[name])
    shared = manager.info("vera").shared_bytes
    manager.acquire("vera")
    manager.acquire("vera-twin")  # same prng key: the same projections
    assert manager.shared.nbytes == shared
    manager.acquire("vera-other")  # another key: its own
    assert manager.shared.nbytes == shared + manager.info("vera-other").shared_bytes
    for name in ("vera", "vera-twin", "vera-other"):
        manager.release(name)
        manager.unload(f"default/{name}")
    manager.apply_drops()
    assert manager.shared.nbytes == 0  # released with the last slot using them
    manager.close()


def test_dora_binds_to_the_base_when_loaded_from_the_store(
    base: PreTrainedModel, dirs: dict[str, Path], tmp_path: Path
) -> None:
    writer = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    store = AdapterStore(tmp_path)
    files = {p.name: p.read_bytes() for p in dirs["dora"].iterdir()}
    staged, entries = stage(store, files)
    registered = writer.validate(staged)
    store.commit(staged, writer.manifest_for("acme/d", 1, registered, entries))
    reader = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    reader.scan(store)
    held = reader.resolve((AdapterRef("acme/d"),))
    (loaded,) = [f.result() for f in reader.ensure_host(held.keys)]
    assert not loaded.needs_base  # bound on the load thread, magnitudes over the norms computed there
    path = "model.layers.0.mlp.down_proj"
    for got, want in zip(loaded.deltas[path].parts(), registered.deltas[path].parts(), strict=True):
        for name, tensor in got.tensors().items():
            assert torch.equal(tensor, want.tensors()[name]), name
    reader.release_holds(held.keys)
    for mgr in (writer, reader):
        mgr.close()
