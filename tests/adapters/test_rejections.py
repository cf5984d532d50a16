"""Everything not served exactly is rejected at registration, with the field or tensor named."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import IA3Config, LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel

from peftserve.adapters import AdapterManager
from peftserve.errors import AdapterRejected, FailedPrecondition
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model

Q0 = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def base() -> PreTrainedModel:
    return build_tiny_model("llama", seed=0)[0]


@pytest.fixture(scope="module")
def lora_dir(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pf.make_lora_patterns(base, "llama", tmp_path_factory.mktemp("good") / "lora")


@pytest.fixture
def manager(base: PreTrainedModel) -> AdapterManager:
    return AdapterManager(copy.deepcopy(base), num_slots=2, device="cpu", dtype=torch.float32)


def _peft_dir(base: PreTrainedModel, config, out: Path) -> Path:
    model = get_peft_model(copy.deepcopy(base), config)
    model.save_pretrained(out)
    return out


def _edited(
    src: Path,
    out: Path,
    config: dict | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
) -> Path:
    shutil.copytree(src, out)
    if config is not None:
        data = json.loads((out / "adapter_config.json").read_text())
        data.update(config)
        (out / "adapter_config.json").write_text(json.dumps(data))
    if tensors is not None:
        state = load_file(out / "adapter_model.safetensors")
        tensors(state)
        save_file(state, out / "adapter_model.safetensors")
    return out


def _reject(manager: AdapterManager, path: Path, *needles: str) -> None:
    with pytest.raises(AdapterRejected) as info:
        manager.register("bad", path)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    with pytest.raises(Exception):  # noqa: B017 - nothing was registered
        manager.info("bad")


TARGETS = ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("peft_config", "needle"),
    [
        (LoraConfig(target_modules=TARGETS, use_dora=True), "use_dora"),
        (LoraConfig(target_modules=TARGETS, bias="all"), "bias"),
        (LoraConfig(target_modules=TARGETS, bias="lora_only"), "bias"),
        (LoraConfig(target_modules=TARGETS, lora_bias=True), "lora_bias"),
        (LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"]), "modules_to_save"),
        (LoraConfig(target_modules=["q_proj", "lm_head"]), "lm_head"),
        (IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]), "peft_type"),
    ],
    ids=["dora", "bias-all", "bias-lora-only", "lora-bias", "modules-to-save", "lm-head", "ia3"],
)
def test_peft_made_unserved_adapters(base, manager, tmp_path, peft_config, needle) -> None:
    _reject(manager, _peft_dir(base, peft_config, tmp_path / "a"), needle)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "lora_ga", "corda", "loftq"])
def test_unconverted_initializations(manager, lora_dir, tmp_path, init) -> None:
    _reject(
        manager, _edited(lora_dir, tmp_path / "a", config={"init_lora_weights": init}), "init_lora_weights"
    )


def _rename_layer(state: dict[str, torch.Tensor]) -> None:
    for suffix in ("lora_A.weight", "lora_B.weight"):
        key = f"{Q0}.{suffix}"
        state[key.replace("layers.0", "layers.9")] = state.pop(key)


def _narrow_a(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_A.weight"] = state[f"{Q0}.lora_A.weight"][:, :32].contiguous()


def _nan(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_B.weight"][0, 0] = float("nan")


def _inf(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_A.weight"][0, 0] = float("inf")


def _huge(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_B.weight"][0, 0] = 3e38  # finite in float32, and overflows any activation


def _large_after_scaling(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_B.weight"][0, 0] = 9000.0  # within the bound as stored, beyond it once scaled


def _drop_b(state: dict[str, torch.Tensor]) -> None:
    del state[f"{Q0}.lora_B.weight"]


def _rank_zero(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_A.weight"] = torch.zeros(0, 64)
    state[f"{Q0}.lora_B.weight"] = torch.zeros(64, 0)


def _extra_bias(state: dict[str, torch.Tensor]) -> None:
    state[f"{Q0}.lora_B.bias"] = torch.zeros(64)


@pytest.mark.parametrize(
    ("edit", "needles"),
    [
        (_rename_layer, ("layers.9", "does not exist")),
        (_narrow_a, ("q_proj", "shape")),
        (_nan, ("NaN",)),
        (_inf, ("Inf",)),
        (_huge, (f"{Q0}.lora_B.weight", "3e+38", "limit of 10000")),
        (_large_after_scaling, ("model.layers.0.self_attn.q_proj.lora_B x scaling", "limit of 10000")),
        (_drop_b, ("lora_B.weight", "missing")),
        (_rank_zero, ("rank 0",)),
        (_extra_bias, ("lora_B.bias",)),
    ],
    ids=[
        "missing-target",
        "shape",
        "nan",
        "inf",
        "huge",
        "huge-after-scaling",
        "missing-b",
        "rank-0",
        "bias-tensor",
    ],
)
def test_bad_tensors(manager, lora_dir, tmp_path, edit, needles) -> None:
    _reject(manager, _edited(lora_dir, tmp_path / "a", tensors=edit), *needles)


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ({"lora_alpha": 1e308}, ("lora_alpha and rank 6", "scaling of 4.08e+307")),
        ({"alpha_pattern": {"v_proj": 1e6}}, ("alpha_pattern['v_proj']", "limit of 10000")),
    ],
    ids=["lora-alpha", "alpha-pattern"],
)
def test_extreme_scalings(manager, lora_dir, tmp_path, config, needles) -> None:
    _reject(manager, _edited(lora_dir, tmp_path / "a", config=config), *needles)


def test_adalora_scaling_is_bounded(base, manager, tmp_path) -> None:
    path = pf.make_adalora(base, "llama", tmp_path / "ada")
    _reject(manager, _edited(path, tmp_path / "a", config={"lora_alpha": 1e9}), "lora_alpha and init_r")


def test_rank_disagreeing_with_config(manager, lora_dir, tmp_path) -> None:
    _reject(manager, _edited(lora_dir, tmp_path / "a", config={"rank_pattern": {}}), "r=4", "lora_A has rank")


def test_unknown_peft_type_and_bad_json(manager, lora_dir, tmp_path) -> None:
    _reject(manager, _edited(lora_dir, tmp_path / "a", config={"peft_type": "VERA"}), "peft_type='VERA'")
    broken = _edited(lora_dir, tmp_path / "b")
    (broken / "adapter_config.json").write_text("{not json")
    _reject(manager, broken, "JSON")


def test_pickle_only_directory_is_never_loaded(manager, lora_dir, tmp_path) -> None:
    out = _edited(lora_dir, tmp_path / "a")
    (out / "adapter_model.safetensors").unlink()
    (out / "adapter_model.bin").write_bytes(b"not even a pickle; it must not be opened")
    _reject(manager, out, "adapter_model.bin", "pickle")


def test_adapters_for_another_architecture(manager, tmp_path) -> None:
    gpt2, _ = build_tiny_model("gpt2", seed=0)  # 4 KV heads of 16 vs the llama base's 2 of 16
    for adapter_dir in (
        pf.make_prefix(gpt2, tmp_path / "p", projection=False),
        pf.make_lora_patterns(gpt2, "gpt2", tmp_path / "l"),
    ):
        with pytest.raises(FailedPrecondition, match="another base model"):
            manager.register("bad", adapter_dir)
