"""LoRA on parameters (target_parameters): peft's layout, the experts' reference semantics, refusals."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from peftserve.adapters import AdapterBatch, AdapterContext, AdapterManager, load_adapter
from peftserve.adapters.experts import MultiAdapterExperts
from peftserve.adapters.forms import LowRankDelta, SharedTensors
from peftserve.adapters.forms.experts import ExpertLowRankDelta, experts_reference
from peftserve.errors import AdapterRejected
from tests.adapters import peft_factory as pf
from tests.helpers.tiny_models import build_tiny_model

MOE = ("mixtral", "qwen3_moe", "gpt_oss")
"""gpt_oss stores its experts transposed ([E, in, out]); the others [E, out, in]."""


@pytest.mark.parametrize("family", MOE)
def test_expert_factors_are_peft_deltas_per_expert(family: str, tmp_path: Path) -> None:
    """Each normalized (b[e] @ a[e]) is expert e's slice of peft's own get_delta_weight."""
    base, _ = build_tiny_model(family)
    folder = pf.make_expert_lora(base, family, tmp_path / "a")
    adapter = load_adapter(folder)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), folder)
    checked = 0
    for name, module in peft_model.named_modules():
        parameter = getattr(module, "parameter_name", None)
        if parameter is None:
            continue
        owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
        with torch.no_grad():
            want = module.get_delta_weight("default")  # the parameter's own layout
        if parameter == "weight":  # the router: a plain (out, in) LoRA
            delta = adapter.deltas[owner]
            assert isinstance(delta, LowRankDelta)
            torch.testing.assert_close(delta.b @ delta.a, want)
        else:
            delta = adapter.deltas[f"{owner}.{parameter}"]
            assert isinstance(delta, ExpertLowRankDelta) and delta.num_experts == 4
            got = delta.b @ delta.a  # [E, out, in]
            if family == "gpt_oss":
                got = got.transpose(1, 2)  # its stack is [E, in, out]
            torch.testing.assert_close(got, want)
            assert delta.rank == (3 if parameter == "down_proj" else 2)  # rank_pattern on the param path
        checked += 1
    moe_layers = sum(1 for layer in base.model.layers if hasattr(layer.mlp, "experts"))
    assert moe_layers and checked == 3 * moe_layers  # gate_up_proj, down_proj and the router of each


def _stack_with(weight: torch.Tensor, deltas: list[tuple[ExpertLowRankDelta, float]], transposed: bool):
    merged = weight.detach().clone()
    for delta, w in deltas:
        update = w * (delta.b @ delta.a)  # [E, out, in]
        merged += update.transpose(1, 2) if transposed else update
    return torch.nn.Parameter(merged)


@pytest.mark.parametrize("family", MOE)
def test_experts_reference_is_the_module_with_merged_weights(family: str) -> None:
    """The recomputation equals the experts module's own forward on its stacks merged with a mixture."""
    base, _ = build_tiny_model(family)
    mlp = base.model.layers[0].mlp
    experts = mlp.experts
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, base.config.hidden_size, generator=gen)  # [n, H]
    router = mlp.router if family == "gpt_oss" else mlp.gate
    _, top_k_weights, top_k_index = router(hidden)

    def random_delta(name: str, rank: int) -> ExpertLowRankDelta:
        stack = getattr(experts, name)  # [E, out, in] or [E, in, out]
        out, inner = stack.shape[1:][::-1] if experts.is_transposed else stack.shape[1:]
        a = torch.randn(stack.shape[0], rank, inner, generator=gen) * 0.2
        return ExpertLowRankDelta(a=a, b=torch.randn(stack.shape[0], out, rank, generator=gen) * 0.2)

    deltas = {
        "gate_up_proj": [(random_delta("gate_up_proj", 2), 0.7), (random_delta("gate_up_proj", 3), -1.2)],
        "down_proj": [(random_delta("down_proj", 2), 1.0)],
    }
    merged = copy.deepcopy(experts)
    for name, pairs in deltas.items():
        setattr(merged, name, _stack_with(getattr(experts, name), pairs, experts.is_transposed))
    with torch.no_grad():
        want = merged(hidden, top_k_index, top_k_weights)
        got = experts_reference(experts, hidden, top_k_index, top_k_weights, deltas)
        plain = experts(hidden, top_k_index, top_k_weights)
    assert (want - plain).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", MOE)
def test_grouped_recomputation_equals_the_reference_per_sequence(family: str) -> None:
    """Sequences sharing slots, mixtures, a slot on one stack only, and a sequence with no adapter."""
    base, _ = build_tiny_model(family)
    mlp = next(layer.mlp for layer in base.model.layers if hasattr(layer.mlp, "experts"))
    router = mlp.router if family == "gpt_oss" else mlp.gate
    context = AdapterContext()
    wrapper = MultiAdapterExperts(mlp.experts, context, 3, "grouped", SharedTensors())
    gen = torch.Generator().manual_seed(1)

    def delta(name: str, rank: int) -> ExpertLowRankDelta:
        stack = wrapper.stacks[name]
        a = torch.randn(stack.num_experts, rank, stack.in_features, generator=gen) * 0.3
        return ExpertLowRankDelta(
            a=a, b=torch.randn(stack.num_experts, stack.out_features, rank, generator=gen) * 0.3
        )

    loaded = {0: {"gate_up_proj": delta("gate_up_proj", 2), "down_proj": delta("down_proj", 3)}}
    loaded[1] = {"down_proj": delta("down_proj", 2)}
    loaded[2] = {"gate_up_proj": delta("gate_up_proj", 4)}
    for slot, stacks in loaded.items():
        for name, d in stacks.items():
            wrapper.stacks[name].load(slot, d)
    spans = [(0, 3, ((0, 1.0),)), (3, 1, ((1, 0.5), (0, -0.3))), (6, 4, ((2, 1.0),)), (10, 1, ((0, 1.0),))]
    hidden = torch.randn(11, base.config.hidden_size, generator=gen)  # [T, H]; rows 4-5 use no adapter
    with torch.no_grad():
        _, weights, index = router(hidden)
        plain = mlp.experts(hidden, index, weights)
        context.batch = AdapterBatch.build(spans, 11, "cpu")
        got = wrapper(hidden, index, weights)
        for start, length, pairs in spans:
            rows = slice(start, start + length)
            deltas: dict = {}
            for slot, w in pairs:
                for name, d in loaded[slot].items():
                    deltas.setdefault(name, []).append((d, w))
            want = experts_reference(mlp.experts, hidden[rows], index[rows], weights[rows], deltas)
            assert (want - plain[rows]).abs().max() > 1e-3
            torch.testing.assert_close(got[rows], want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[4:6], plain[4:6])


def test_lora_on_a_linear_weight_by_parameter_is_plain_lora(tmp_path: Path) -> None:
    base, _ = build_tiny_model("llama")
    config = LoraConfig(r=2, lora_alpha=6, target_modules=[], target_parameters=["q_proj.weight"])
    model = get_peft_model(copy.deepcopy(base), config)
    pf._fill(model, 3, 0.2, ("lora_A", "lora_B"))
    model.save_pretrained(tmp_path / "a")
    served = copy.deepcopy(base)
    manager = AdapterManager(served, num_slots=1, device="cpu", dtype=torch.float32)
    manager.register("a", tmp_path / "a")
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        manager.set_batch(manager.build_batch([(0, 9, ((manager.acquire("a"), 1.0),))], 9))
        got = served(input_ids=ids).logits
    want = pf.peft_logits(base, tmp_path / "a", ids)
    assert (want - base(input_ids=ids).logits).abs().max() > 1e-2
    assert (got - want).abs().max() <= 1e-4


def _register(family: str, folder: Path) -> None:
    base, _ = build_tiny_model(family)
    AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32).register("x", folder)


def _peft_made(family: str, targets: list[str], out: Path) -> Path:
    base, _ = build_tiny_model(family)
    config = LoraConfig(r=2, target_modules=[], target_parameters=targets, init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), config).save_pretrained(out)
    return out


def _edit_config(source: Path, out: Path, **fields: object) -> Path:
    shutil.copytree(source, out)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, **fields}))
    return out


def test_an_expert_bias_is_refused_naming_it(tmp_path: Path) -> None:
    folder = _peft_made("gpt_oss", ["experts.gate_up_proj_bias"], tmp_path / "a")
    with pytest.raises(AdapterRejected, match=r"LoRA on 'model\.layers\.0\.mlp\.experts\.gate_up_proj_bias'"):
        _register("gpt_oss", folder)


def test_a_parameter_outside_the_layers_is_refused_naming_the_module(tmp_path: Path) -> None:
    folder = _peft_made("mixtral", ["embed_tokens.weight"], tmp_path / "a")
    with pytest.raises(AdapterRejected, match=r"'model\.embed_tokens' is not served"):
        _register("mixtral", folder)


def test_nested_factors_must_match_the_named_parameters(tmp_path: Path) -> None:
    base, _ = build_tiny_model("mixtral")
    good = pf.make_expert_lora(base, "mixtral", tmp_path / "good")
    one = _edit_config(good, tmp_path / "one", target_parameters=["experts.down_proj", "gate.weight"])
    with pytest.raises(AdapterRejected, match=r"2 nested lora_A/lora_B pairs, but target_parameters names 1"):
        _register("mixtral", one)
    rank = _edit_config(good, tmp_path / "rank", rank_pattern={r".*\.gate_up_proj": 3})
    with pytest.raises(AdapterRejected, match=r"lora_A has 8 rows, not a multiple of the configured rank 3"):
        _register("mixtral", rank)


def test_adalora_never_takes_target_parameters(tmp_path: Path) -> None:
    base, _ = build_tiny_model("mixtral")
    folder = _edit_config(pf.make_adalora(base, "mixtral", tmp_path / "a"), tmp_path / "b")
    folder = _edit_config(folder, tmp_path / "c", target_parameters=["experts.down_proj"])
    with pytest.raises(AdapterRejected, match="target_parameters"):
        _register("mixtral", folder)


def test_the_manifest_lists_the_expert_ranks(tmp_path: Path) -> None:
    base, _ = build_tiny_model("mixtral")
    manager = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    manifest = manager.register("e", pf.make_expert_lora(base, "mixtral", tmp_path / "e"))
    assert manifest.ranks == (2, 3)  # r=2 everywhere, rank_pattern 3 on the experts' down_proj
    assert "model.layers.0.mlp.experts.gate_up_proj" in manifest.target_modules
