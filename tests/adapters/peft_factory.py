"""Adapters made by peft itself (non-zero weights) on copies of a tiny base model, saved as PEFT dirs."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import (
    AdaLoraConfig,
    IA3Config,
    LoHaConfig,
    LoKrConfig,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    ShiraConfig,
    VeraConfig,
    get_peft_model,
)
from torch import nn
from transformers import PreTrainedModel

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
FAMILY_TARGETS = {
    "gpt2": GPT2_TARGETS,
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "starcoder2": ["q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj"],
}
"""Every projection of families not named like Llama's. On Qwen3-MoE peft itself turns the MLP names into
LoRA on the experts' fused parameters (target_parameters), with the fused ranks doubled."""
LAYER_TARGETS = {
    "gpt2": ["c_attn", "c_fc"],
    "phi3": ["qkv_proj", "gate_up_proj"],
    "starcoder2": ["q_proj", "v_proj", "c_fc"],
    "qwen3_moe": ["q_proj", "v_proj", "o_proj"],  # peft refuses up_proj alone (fused with gate_proj)
}
"""Some modules of one layer (make_lora_layers); Llama's names otherwise."""


def targets(family: str) -> list[str]:
    return FAMILY_TARGETS.get(family, LLAMA_TARGETS)


def linear_targets(family: str) -> list[str]:
    """targets() without the names peft turns into LoRA on experts (Qwen3-MoE's MLP): kinds peft cannot
    put on parameters (DoRA) stay on the Linear layers."""
    return ["q_proj", "k_proj", "v_proj", "o_proj"] if family == "qwen3_moe" else targets(family)


def _fill(model: nn.Module, seed: int, std: float, names: tuple[str, ...], around: float = 0.0) -> None:
    """Overwrite the adapter parameters whose name contains one of `names` with seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in names):
                param.copy_(around + torch.randn(param.shape, generator=gen) * std)


def _perturb(model: nn.Module, seed: int, std: float, names: tuple[str, ...]) -> None:
    """Multiply the adapter parameters whose name contains one of `names` by (1 + seeded noise)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(n in name for n in names):
                param.mul_(1 + torch.randn(param.shape, generator=gen) * std)


def _save(model: PeftModel, out: Path) -> Path:
    model.save_pretrained(out)
    return out


def make_lora_patterns(base: PreTrainedModel, family: str, out: Path, seed: int = 1) -> Path:
    """LoRA on every projection with rank_pattern (regex and suffix keys), alpha_pattern and rslora."""
    if family == "gpt2":
        rank_pattern = {r"h\.1\.attn\.c_attn": 2, "c_fc": 6}
        alpha_pattern = {"mlp.c_proj": 16}
    else:
        rank_pattern = {r"model\.layers\.1\.self_attn\.q_proj": 2, "down_proj": 6}
        alpha_pattern = {"v_proj": 16}
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_rslora=True,
        target_modules=targets(family),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.1, ("lora_A", "lora_B"))
    return _save(model, out)


def make_lora_layers(base: PreTrainedModel, family: str, out: Path, seed: int = 2) -> Path:
    """Plain LoRA on some modules of layer 1 only (layers_to_transform)."""
    modules = LAYER_TARGETS.get(family, ["q_proj", "v_proj", "up_proj"])
    config = LoraConfig(r=3, lora_alpha=5, target_modules=modules, layers_to_transform=[1])
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.15, ("lora_A", "lora_B"))
    return _save(model, out)


def make_adalora(base: PreTrainedModel, family: str, out: Path, seed: int = 3) -> Path:
    """AdaLoRA trained a few steps with update_and_allocate, so ranks are pruned unevenly at save."""
    total_step = 8
    config = AdaLoraConfig(
        init_r=6,
        target_r=2,
        lora_alpha=8,
        tinit=1,
        tfinal=2,
        deltaT=1,
        total_step=total_step,
        target_modules=targets(family),
    )
    model = get_peft_model(copy.deepcopy(base), config)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, base.config.vocab_size, (2, 12), generator=gen)  # [B, S]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(total_step):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    # Training this briefly leaves a tiny delta; enlarge A and B (pruning lives in E, which is kept).
    _fill(model, seed, 0.3, ("lora_A", "lora_B"))
    model.eval()
    return _save(model, out)


def _magnitude_mask(base_layer: nn.Module, r: int, **_: object) -> torch.Tensor:
    """A custom SHiRA mask: the r*(m+n) largest-magnitude entries (a stand-in for a gradient mask)."""
    weight = base_layer.weight
    k = r * (weight.shape[0] + weight.shape[1])
    mask = torch.zeros_like(weight)
    mask.view(-1)[weight.abs().view(-1).topk(k).indices] = 1.0
    return mask


def make_shira(base: PreTrainedModel, family: str, out: Path, seed: int = 4) -> Path:
    """SHiRA (sparse delta) with a custom mask_fn on the attention and MLP projections (Linear only)."""
    config = ShiraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"], init_weights=False)
    config.mask_fn = _magnitude_mask
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.05, ("shira_weight",))
    return _save(model, out)


def make_prefix(base: PreTrainedModel, out: Path, projection: bool, seed: int = 5) -> Path:
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=24
    )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.5, ("prompt_encoder",))
    return _save(model, out)


def make_dora(base: PreTrainedModel, family: str, out: Path, seed: int = 6) -> Path:
    """DoRA on every projection, with rslora and rank/alpha patterns; magnitudes moved off their init."""
    if family == "gpt2":
        rank_pattern, alpha_pattern = {"c_fc": 6}, {r"h\.1\.attn\.c_attn": 12}
    else:
        rank_pattern, alpha_pattern = (
            {"down_proj": 6, r"model\.layers\.1\.self_attn\.q_proj": 2},
            {"v_proj": 12},
        )
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        use_dora=True,
        use_rslora=True,
        target_modules=linear_targets(family),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        init_lora_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.1, ("lora_A", "lora_B"))
    _perturb(model, seed + 100, 0.2, ("lora_magnitude_vector",))
    return _save(model, out)


def make_ia3(base: PreTrainedModel, family: str, out: Path, seed: int = 7, other: bool = False) -> Path:
    """IA³ with peft's split: input scaling on the feedforward modules, output scaling elsewhere."""
    if family == "gpt2":
        config = IA3Config(
            target_modules=["c_attn", "attn.c_proj", "mlp.c_proj"], feedforward_modules=["mlp.c_proj"]
        )
    elif other:  # every projection, two of them on the input side
        config = IA3Config(target_modules=LLAMA_TARGETS, feedforward_modules=["down_proj", "o_proj"])
    else:  # peft's defaults for Llama-like models
        config = IA3Config(
            target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]
        )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.3, ("ia3_l",), around=1.0)
    return _save(model, out)


def make_loha(base: PreTrainedModel, family: str, out: Path, seed: int = 8) -> Path:
    """LoHa with a rank pattern: r=4 modules are served as rank 16, the r=8 ones (rank 64) densely."""
    config = LoHaConfig(
        r=4,
        alpha=8,
        target_modules=LLAMA_TARGETS,
        rank_pattern={"down_proj": 8, r"model\.layers\.1\.self_attn\.q_proj": 8},
        alpha_pattern={"up_proj": 3},
        init_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.2, ("hada_",))
    return _save(model, out)


def make_lokr(base: PreTrainedModel, family: str, out: Path, seed: int = 9) -> Path:
    """LoKr with whole and low-rank factors (decompose_both, and a smaller rank on down_proj)."""
    config = LoKrConfig(
        r=4,
        alpha=8,
        target_modules=LLAMA_TARGETS,
        decompose_both=True,
        rank_pattern={"down_proj": 2},
        alpha_pattern={"q_proj": 3},
        init_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.2, ("lokr_",))
    return _save(model, out)


def make_vera(base: PreTrainedModel, family: str, out: Path, seed: int = 10, prng_key: int = 0) -> Path:
    """VeRA on every projection (projections saved, peft's default) with non-trivial vectors."""
    config = VeraConfig(r=8, target_modules=targets(family), projection_prng_key=prng_key)
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.5, ("vera_lambda_b",), around=1.0)
    _fill(model, seed + 1, 0.5, ("vera_lambda_d",))
    return _save(model, out)


def peft_logits(base: PreTrainedModel, adapter_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """PEFT's own forward for one adapter alone, reloaded from disk onto a fresh copy of the base."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def merged_mixture(base: PreTrainedModel, parts: list[tuple[Path, float]]) -> PreTrainedModel:
    """A copy of the base plus sum_i w_i * (merged_i - base), merged_i = peft's merge_and_unload of adapter i.

    The merged-weights reading of a mixture, for every kind: peft itself merges each adapter (DoRA's
    magnitudes, IA³'s scalings of weights and biases included).
    """
    mixed = copy.deepcopy(base)
    reference = dict(base.named_parameters())
    with torch.no_grad():
        for adapter_dir, weight in parts:
            model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
            merged = dict(model.merge_and_unload().named_parameters())
            for name, param in mixed.named_parameters():
                param += weight * (merged[name] - reference[name])
    return mixed


def make_all(base: PreTrainedModel, family: str, root: Path) -> dict[str, Path]:
    """One adapter of every served delta kind peft can put on this family (prefix tuning aside)."""
    dirs = {
        "lora-patterns": make_lora_patterns(base, family, root / "lora-patterns"),
        "lora-layers": make_lora_layers(base, family, root / "lora-layers"),
        "adalora": make_adalora(base, family, root / "adalora"),
        "dora": make_dora(base, family, root / "dora"),
        "ia3": make_ia3(base, family, root / "ia3"),
        "vera": make_vera(base, family, root / "vera"),
    }
    if family != "gpt2":  # peft's SHiRA, LoHa and LoKr wrap nn.Linear only, not GPT-2's Conv1D
        dirs["shira"] = make_shira(base, family, root / "shira")
        dirs["ia3-other"] = make_ia3(base, family, root / "ia3-other", seed=11, other=True)
        dirs["loha"] = make_loha(base, family, root / "loha")
        dirs["lokr"] = make_lokr(base, family, root / "lokr")
        dirs["vera-other"] = make_vera(base, family, root / "vera-other", seed=12, prng_key=5)
    return dirs


MIXTURES: tuple[tuple[tuple[str, float], ...], ...] = (
    (("lora-patterns", 0.7), ("lora-layers", -0.4)),
    (("dora", 0.6), ("ia3", 0.5), ("lora-layers", 0.3)),  # input and output scaling on one module
    (("vera", 0.8), ("loha", -0.5), ("lokr", 0.3), ("vera-other", 0.4)),
    (("ia3", 0.7), ("ia3-other", 0.6), ("shira", -1.2)),
)
"""Weighted mixtures across kinds (a test keeps those whose adapters the family has)."""


def _router_name(model: nn.Module) -> str:
    """The attribute name of the router beside a model's experts ('gate', or 'router' in GPT-OSS)."""
    for path, _ in model.named_modules():
        if path.endswith(".experts"):
            parent = model.get_submodule(path.rpartition(".")[0])
            for name, child in parent.named_children():
                weight = getattr(child, "weight", None)
                if name != "experts" and not isinstance(child, nn.Linear) and weight is not None:
                    return name
    raise ValueError("the model has no experts module with a router beside it")


def make_expert_lora(base: PreTrainedModel, family: str, out: Path, seed: int = 6) -> Path:
    """LoRA on the stacked experts and the router (target_parameters) and on q_proj, v_proj; rslora,
    and a rank_pattern on the down projections (the key is the parameter's path)."""
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        use_rslora=True,
        target_modules=["q_proj", "v_proj"],
        target_parameters=["experts.gate_up_proj", "experts.down_proj", f"{_router_name(base)}.weight"],
        rank_pattern={r".*\.experts\.down_proj": 3},
        init_lora_weights=False,
    )
    model = get_peft_model(copy.deepcopy(base), config)
    _fill(model, seed, 0.1, ("lora_A", "lora_B"))
    return _save(model, out)
