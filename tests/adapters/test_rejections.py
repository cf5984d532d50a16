"""Everything not served exactly is rejected at registration, with the field or tensor named."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import BOFTConfig, IA3Config, LoraConfig, VeraConfig, get_peft_model
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
        (LoraConfig(target_modules=TARGETS, use_dora=True, bias="all"), "bias"),
        (VeraConfig(target_modules=TARGETS, r=4, save_projection=False), "save_projection"),
        (VeraConfig(target_modules=TARGETS, r=4, bias="all"), "bias"),
        (LoraConfig(target_modules=TARGETS, bias="all"), "bias"),
        (LoraConfig(target_modules=TARGETS, bias="lora_only"), "bias"),
        (LoraConfig(target_modules=TARGETS, lora_bias=True), "lora_bias"),
        (LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"]), "modules_to_save"),
        (LoraConfig(target_modules=["q_proj", "lm_head"]), "lm_head"),
        (
            IA3Config(target_modules=["k_proj"], feedforward_modules=[], modules_to_save=["lm_head"]),
            "modules_to_save",
        ),
        (BOFTConfig(target_modules=TARGETS, boft_block_size=4), "peft_type='BOFT'"),
    ],
    ids=[
        "dora-bias",
        "vera-no-projection",
        "vera-bias",
        "bias-all",
        "bias-lora-only",
        "lora-bias",
        "modules-to-save",
        "lm-head",
        "ia3-modules-to-save",
        "unserved-peft-type",
    ],
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
    _reject(manager, _edited(lora_dir, tmp_path / "a", config={"peft_type": "OFT"}), "peft_type='OFT'")
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


@pytest.fixture(scope="module")
def kind_dirs(base: PreTrainedModel, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("kinds")
    return {
        "dora": pf.make_dora(base, "llama", root / "dora"),
        "ia3": pf.make_ia3(base, "llama", root / "ia3"),
        "loha": pf.make_loha(base, "llama", root / "loha"),
        "lokr": pf.make_lokr(base, "llama", root / "lokr"),
        "vera": pf.make_vera(base, "llama", root / "vera"),
    }


def _set(key: str, value: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict], None]:
    def edit(state: dict[str, torch.Tensor]) -> None:
        state[key] = value(state[key])

    return edit


def _drop(key: str) -> Callable[[dict], None]:
    return lambda state: state.pop(key)


DOWN0 = "base_model.model.model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    ("kind", "config", "edit", "needles"),
    [
        ("dora", None, _drop(f"{Q0}.lora_magnitude_vector"), ("lora_magnitude_vector is missing",)),
        (
            "dora",
            None,
            _set(f"{Q0}.lora_magnitude_vector", lambda t: t[:8]),
            ("lora_magnitude_vector has 8",),
        ),
        # within the bound as stored; divided by the merged weight's norm, beyond it
        (
            "dora",
            None,
            _set(f"{Q0}.lora_magnitude_vector", lambda t: t * 0 + 9000),
            ("magnitude_vector/norm", "limit"),
        ),
        (
            "ia3",
            {"feedforward_modules": ["k_proj", "down_proj"]},
            None,
            ("k_proj", "shape (32, 1)", "(1, in)"),
        ),
        ("ia3", {"feedforward_modules": []}, None, ("down_proj", "ia3_l has shape (1, 128)", "(out, 1)")),
        ("ia3", None, _set(f"{DOWN0}.ia3_l", lambda t: t * 0 + 2e4), (f"{DOWN0}.ia3_l", "limit of 10000")),
        ("loha", {"r": 5}, None, ("r=5", "hada_w1_a")),
        ("loha", {"alpha": 1e9}, None, ("alpha and rank", "limit of 10000")),
        ("loha", None, _drop(f"{Q0}.hada_w2_b"), ("hada_w2_b is missing",)),
        ("lokr", None, _drop(f"{DOWN0}.lokr_w2_a"), ("lokr_w2",)),
        ("lokr", {"rank_pattern": {}}, None, ("r=4", "lokr_w1_a has rank 2")),
        ("vera", None, _drop("base_model.vera_A"), ("base_model.vera_A", "missing")),
        ("vera", None, _set(f"{Q0}.vera_lambda_d", lambda t: t[:4]), ("vera_lambda_d (4,)",)),
        ("vera", {"r": 4}, None, ("r=4",)),
    ],
    ids=[
        "dora-no-magnitude",
        "dora-magnitude-shape",
        "dora-huge-after-norm",
        "ia3-side-input",
        "ia3-side-output",
        "ia3-huge",
        "loha-rank",
        "loha-alpha",
        "loha-missing",
        "lokr-missing",
        "lokr-rank",
        "vera-no-projection",
        "vera-lambda-rank",
        "vera-config-rank",
    ],
)
def test_new_kinds_name_the_field(manager, kind_dirs, tmp_path, kind, config, edit, needles) -> None:
    _reject(manager, _edited(kind_dirs[kind], tmp_path / "a", config=config, tensors=edit), *needles)


def test_limits_per_form(base, kind_dirs, tmp_path) -> None:
    """max_rank bounds every form: LoRA-like ranks, VeRA's rank, dense and factor entries."""
    small = AdapterManager(copy.deepcopy(base), num_slots=2, device="cpu", dtype=torch.float32, max_rank=4)
    _reject(small, kind_dirs["dora"], "rank 6 exceeds the server's max rank 4")
    _reject(small, kind_dirs["vera"], "VeRA rank 8 exceeds")
    _reject(small, kind_dirs["loha"], "LoHa r=")  # rank 16 as factors, or dense beyond 4 * (out + in)
    small.register("lokr", kind_dirs["lokr"])  # its factors hold no more than 1 * (out + in) entries
    small.register("ia3", kind_dirs["ia3"])  # vectors: no rank to bound
