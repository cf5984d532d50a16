"""Every served family, through the engine, equals transformers and PEFT: the support matrix's cells.

For each family, on its tiny random model (tests/helpers/tiny_models.py):
- the base model's greedy tokens equal transformers' own, logits within 1e-4, with chunked prefill,
  requests joining mid-flight and prompts longer than its sliding window;
- the adapters of every exact cell (tests/helpers/support_matrix.py) are served in one continuously
  batched run, twice each, beside base requests and a weighted mixture; each request's logits equal
  PEFT's own forward for its adapter alone within 1e-4 and its greedy tokens are identical;
- in a forward of a mixed batch, base rows are bitwise the base model's;
- refused cells are refused with their reason, and n/a cells are ones peft cannot make.
The traits a family brings (soft-caps, windows, sinks, query scalar) are live in its tiny model:
switched off, the reference moves, so the comparisons above would notice a server that ignored them.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoHaConfig, LoKrConfig, PeftModel, ShiraConfig, get_peft_model
from peft.utils.transformers_weight_conversion import _MODEL_TO_CONVERSION_PATTERN
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from peftserve.adapters import AdapterContext, AdapterManager
from peftserve.adapters.experts import wrap_experts
from peftserve.adapters.forms import SharedTensors
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from peftserve.errors import AdapterRejected
from peftserve.model import families as fam
from tests.adapters import peft_factory as pf
from tests.engine.conftest import Recorded, random_prompts, run_recording
from tests.engine.test_adapter_fidelity import reference_run
from tests.helpers.support_matrix import (
    CONV1D_NA,
    EXACT,
    KINDS,
    NA,
    NO_EXPERTS,
    NO_V4_LAYOUT,
    REFUSED,
    V4_REASON,
    cells,
)
from tests.helpers.tiny_models import ALL_FAMILIES, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-4
NEW_TOKENS = 20
PREFIX_KINDS = ("prefix",)
"""Kinds that live in the KV cache rather than in the layers (not in a plain forward's mixed batch)."""


@dataclass
class Setup:
    family: str
    base: PreTrainedModel
    """Pristine base, never wrapped."""
    tokenizer: PreTrainedTokenizerFast
    adapters: dict[str, Path]
    """Every variant of every exact kind of the family."""
    layer_adapters: list[str]
    """The ones computed in the layers (all but prefix tuning)."""
    mixture: tuple[tuple[str, float], ...]


@pytest.fixture(scope="module", params=ALL_FAMILIES)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    family = request.param
    base, tokenizer = build_tiny_model(family)
    root = tmp_path_factory.mktemp(f"family-{family}")
    adapters: dict[str, Path] = {}
    layer_adapters: list[str] = []
    for kind in KINDS:
        if kind.cell(family).verdict != EXACT:
            continue
        for name, make in kind.variants.items():
            adapters[name] = make(base, family, root / name)
            if kind.name not in PREFIX_KINDS:
                layer_adapters.append(name)
    first = "experts" if fam.FAMILIES[family].moe else "lora-layers"
    mixture = ((first, 0.7), ("adalora", -0.4), ("ia3", 0.5))  # low rank and input/output scaling
    return Setup(family, base, tokenizer, adapters, layer_adapters, mixture)


def make_engine(setup: Setup, adapters: bool, **config) -> LLMEngine:
    model = copy.deepcopy(setup.base)
    manager = None
    if adapters:
        manager = AdapterManager(model, num_slots=len(setup.adapters), device="cpu", dtype=torch.float32)
        for name, path in setup.adapters.items():
            manager.register(name, path)
    config = {"kv_cache_mb": 2, "block_size": 4, "max_batched_tokens": 48, **config}
    return LLMEngine.from_model(model, setup.tokenizer, EngineConfig(**config), adapters=manager)


def make_request(rid: str, prompt: list[int], refs: tuple[tuple[str, float], ...] = ()) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        prompt_token_ids=prompt,
        sampling=SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True),
        adapters=tuple(AdapterRef(name, weight) for name, weight in refs),
    )


def check_against(reference: PreTrainedModel, request: GenerationRequest, got: Recorded) -> None:
    want_tokens, want_logits = reference_run(reference, request.prompt_token_ids, NEW_TOKENS)
    err = (got.logits - want_logits).abs().max().item()
    assert err <= TOL, f"{request.request_id}: max |Δlogit| {err:.2e}"
    assert got.token_ids == want_tokens, request.request_id


def test_base_model_equals_transformers(setup: Setup) -> None:
    # 24 tokens a step: the 40- and 33-token prompts prefill in chunks; three requests join later.
    engine = make_engine(setup, adapters=False, max_batched_tokens=24)
    prompts = random_prompts([5, 17, 40, 1, 33, 9], engine.model_info.vocab_size)
    requests = [make_request(str(i), p) for i, p in enumerate(prompts)]
    recorded = run_recording(engine, [requests[:3], requests[3:4], requests[4:]], every=4)
    for r in requests:
        check_against(setup.base, r, recorded[r.request_id])


def test_every_adapter_kind_in_mixed_batches_equals_peft(setup: Setup) -> None:
    engine = make_engine(setup, adapters=True)
    uses: list[tuple[tuple[str, float], ...]] = [((n, 1.0),) for n in setup.adapters] + [()]
    uses = uses + uses + [setup.mixture]  # every adapter twice, base twice, a weighted mixture
    prompts = random_prompts([3 + 5 * i % 29 for i in range(len(uses))], engine.model_info.vocab_size, 7)
    requests = [
        make_request(f"{i}-{'+'.join(n for n, _ in use) or 'base'}", p, use)
        for i, (use, p) in enumerate(zip(uses, prompts, strict=True))
    ]
    half = len(requests) // 2
    recorded = run_recording(engine, [requests[:half], requests[half:]])  # the second half joins later

    references: dict[tuple, PreTrainedModel] = {(): setup.base}
    for name, path in setup.adapters.items():
        references[((name, 1.0),)] = PeftModel.from_pretrained(copy.deepcopy(setup.base), path).eval()
    parts = [(setup.adapters[n], w) for n, w in setup.mixture]
    references[setup.mixture] = pf.merged_mixture(setup.base, parts)
    for use, r in zip(uses, requests, strict=True):
        check_against(references[use], r, recorded[r.request_id])


def test_base_rows_of_a_mixed_batch_are_bitwise_the_base_model(setup: Setup) -> None:
    model = copy.deepcopy(setup.base)
    manager = AdapterManager(model, num_slots=len(setup.layer_adapters), device="cpu", dtype=torch.float32)
    for name in setup.layer_adapters:
        manager.register(name, setup.adapters[name])
    rows: list[tuple[tuple[str, float], ...]] = []
    for name in setup.layer_adapters:
        rows += [((name, 1.0),), ()]
    rows.append(setup.mixture)
    seq = 9
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(3, setup.base.config.vocab_size, (len(rows), seq), generator=gen)  # [B, S]
    spans = [
        (row * seq, seq, tuple((manager.acquire(n), w) for n, w in refs))
        for row, refs in enumerate(rows)
        if refs
    ]
    with torch.no_grad():
        manager.set_batch(manager.build_batch(spans, ids.numel()))
        logits = model(input_ids=ids).logits  # [B, S, V]
        manager.set_batch(None)
        base_logits = setup.base(input_ids=ids).logits
    for row, refs in enumerate(rows):
        if not refs:
            assert torch.equal(logits[row], base_logits[row]), f"base row {row} differs from the base model"
            continue
        if len(refs) == 1:
            expected = pf.peft_logits(setup.base, setup.adapters[refs[0][0]], ids[row : row + 1])[0]
        else:
            merged = pf.merged_mixture(setup.base, [(setup.adapters[n], w) for n, w in refs])
            with torch.no_grad():
                expected = merged(input_ids=ids[row : row + 1]).logits[0]
        effect = (expected - base_logits[row]).abs().max().item()
        assert effect > 1e-2, f"{refs}: the adapter is too weak to test anything ({effect:.1e})"
        err = (logits[row] - expected).abs().max().item()
        assert err <= TOL, f"{refs}: max |Δlogit| {err:.2e} vs PEFT"


# -- the traits are live ---------------------------------------------------------------------------


def _modules_with(model: PreTrainedModel, attribute: str) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, attribute, None) is not None]


def _no_attention_softcap(model: PreTrainedModel) -> None:
    for module in _modules_with(model, "attn_logit_softcapping"):
        module.attn_logit_softcapping = None


def _no_final_softcap(model: PreTrainedModel) -> None:
    model.config.final_logit_softcapping = None


def _no_window(model: PreTrainedModel) -> None:
    # transformers' own attention reads the window from its mask, built from the config
    model.config.sliding_window = 1 << 20
    for module in _modules_with(model, "sliding_window"):
        module.sliding_window = 1 << 20


def _no_sinks(model: PreTrainedModel) -> None:
    for module in _modules_with(model, "sinks"):
        module.sinks.data.fill_(-1e9)


def _head_dim_scaling(model: PreTrainedModel) -> None:
    for module in _modules_with(model, "scaling"):
        if hasattr(module, "head_dim"):
            module.scaling = module.head_dim**-0.5


SWITCHES: dict[str, list[Callable[[PreTrainedModel], None]]] = {
    fam.SOFTCAP: [_no_attention_softcap, _no_final_softcap],
    fam.FINAL_SOFTCAP: [_no_final_softcap],
    fam.SLIDING: [_no_window],
    fam.SINKS: [_no_sinks],
    fam.QUERY_SCALAR: [_head_dim_scaling],
}
"""What turns each trait off in a model (traits without an entry are structural: experts, q/k norms)."""


@pytest.mark.parametrize("family", [f for f in ALL_FAMILIES if set(fam.FAMILIES[f].traits) & set(SWITCHES)])
def test_the_family_traits_are_live_in_its_tiny_model(family: str) -> None:
    base, _ = build_tiny_model(family)
    prompt = torch.tensor([random_prompts([40], base.config.vocab_size, seed=1)[0]])  # longer than windows
    with torch.no_grad():
        want = base(input_ids=prompt).logits
        for trait in fam.FAMILIES[family].traits:
            for switch in SWITCHES.get(trait, ()):
                changed = copy.deepcopy(base)
                switch(changed)
                moved = (changed(input_ids=prompt).logits - want).abs().max().item()
                assert moved > 0.1, f"{family}: {switch.__name__} moves the logits by only {moved:.1e}"


# -- refused and n/a cells -------------------------------------------------------------------------


V4_EXPERTS = {
    "mixtral": ("block_sparse_moe.experts", {"w1": "up", "w3": "up", "w2": "down"}, ["w1", "w2", "w3"]),
    "qwen3_moe": (
        "mlp.experts",
        {"gate_proj": "up", "up_proj": "up", "down_proj": "down"},
        ["gate_proj", "up_proj", "down_proj"],
    ),
}
"""Where transformers 4 kept each expert as Linear modules, their names, and the targets peft saved."""


def write_v4_expert_lora(base: PreTrainedModel, family: str, out: Path, rank: int = 2) -> Path:
    """A LoRA folder as peft saved it for transformers 4's per-expert Linear modules (and q_proj)."""
    config = base.config
    hidden = config.hidden_size
    inner = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    where, modules, targets = V4_EXPERTS[family]
    gen = torch.Generator().manual_seed(9)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"base_model.model.model.layers.{layer}"
        for expert in range(config.num_local_experts):
            for module, direction in modules.items():
                fan_in, fan_out = (hidden, inner) if direction == "up" else (inner, hidden)
                key = f"{prefix}.{where}.{expert}.{module}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen) * 0.1
        q_out = base.model.layers[layer].self_attn.q_proj.out_features
        tensors[f"{prefix}.self_attn.q_proj.lora_A.weight"] = torch.randn(rank, hidden, generator=gen) * 0.1
        tensors[f"{prefix}.self_attn.q_proj.lora_B.weight"] = torch.randn(q_out, rank, generator=gen) * 0.1
    os.makedirs(out)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    peft_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 4, "bias": "none"}
    peft_config["target_modules"] = [*targets, "q_proj"]
    (out / "adapter_config.json").write_text(json.dumps(peft_config))
    return out


def check_v4_experts_refused(family: str, reason: str, tmp_path: Path) -> None:
    """Refused naming the module and the way out; and the way out (peft converts, save again) is exact."""
    base, _ = build_tiny_model(family)
    v4 = write_v4_expert_lora(base, family, tmp_path / "v4")
    model = copy.deepcopy(base)
    manager = AdapterManager(model, num_slots=2, device="cpu", dtype=torch.float32)
    with pytest.raises(AdapterRejected, match=V4_REASON) as refused:
        manager.register("v4", v4)
    assert ".experts.0." in str(refused.value) and "save it again" in reason
    converted = tmp_path / "converted"
    PeftModel.from_pretrained(copy.deepcopy(base), v4).save_pretrained(converted)
    manager.register("converted", converted)
    ids = torch.randint(3, base.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(2))
    slot = manager.acquire("converted")
    with torch.no_grad():
        manager.set_batch(manager.build_batch([(0, ids.shape[1], ((slot, 1.0),))], ids.numel()))
        got = model(input_ids=ids).logits
        manager.set_batch(None)
    want = pf.peft_logits(base, v4, ids)  # peft's own load of the transformers 4 files
    assert (want - base(input_ids=ids).logits).abs().max().item() > 1e-2
    assert (got - want).abs().max().item() <= TOL


REFUSALS: dict[str, Callable[[str, str, Path], None]] = {"experts-v4": check_v4_experts_refused}
"""kind -> check that the server refuses that family's adapters of the kind with the cell's reason."""


@pytest.mark.parametrize(("family", "kind"), [(f, k.name) for f, k in cells(REFUSED)])
def test_refused_cells_are_refused_with_their_reason(family: str, kind: str, tmp_path: Path) -> None:
    reason = next(k for k in KINDS if k.name == kind).cell(family).reason
    REFUSALS[kind](family, reason, tmp_path)


def _linear_only_kinds_refuse_conv1d(family: str, tmp_path: Path) -> None:
    base, _ = build_tiny_model(family)
    for config in (ShiraConfig, LoHaConfig, LoKrConfig):
        with pytest.raises(TypeError, match="Conv1D.*not supported"):
            get_peft_model(copy.deepcopy(base), config(r=2, target_modules=["c_attn"]))


def _has_no_experts(family: str, tmp_path: Path) -> None:
    base, _ = build_tiny_model(family)
    assert wrap_experts(copy.deepcopy(base), AdapterContext(), 1, "grouped", SharedTensors()) == {}
    assert all(p.dim() <= 2 for p in base.parameters())


def _nothing_to_convert(family: str, tmp_path: Path) -> None:
    assert _MODEL_TO_CONVERSION_PATTERN.get(family) is None
    base, _ = build_tiny_model(family)
    assert wrap_experts(copy.deepcopy(base), AdapterContext(), 1, "grouped", SharedTensors())


NA_CHECKS: dict[str, Callable[[str, Path], None]] = {
    CONV1D_NA: _linear_only_kinds_refuse_conv1d,
    NO_EXPERTS: _has_no_experts,
    NO_V4_LAYOUT: _nothing_to_convert,
}
"""The reason of an n/a cell -> the check that it holds."""


@pytest.mark.parametrize(("family", "kind"), [(f, k.name) for f, k in cells(NA)])
def test_na_cells_are_adapters_peft_cannot_make(family: str, kind: str, tmp_path: Path) -> None:
    reason = next(k for k in KINDS if k.name == kind).cell(family).reason
    NA_CHECKS[reason](family, tmp_path)
