"""Invariant: each row of a mixed-adapter batch equals PEFT's own forward for its adapter alone."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import PreTrainedModel

from peftserve.adapters import AdapterManager
from tests.adapters import peft_factory as pf
from tests.helpers.devices import interpreted, needs_cuda
from tests.helpers.tiny_models import FAMILIES, build_tiny_model

SEQ = 7
TOL = 1e-4


@dataclass
class Setup:
    family: str
    base: PreTrainedModel
    """Pristine base, never wrapped."""
    dirs: dict[str, Path]


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    family = request.param
    base, _ = build_tiny_model(family, seed=0)
    root = tmp_path_factory.mktemp(f"adapters-{family}")
    return Setup(family, base, pf.make_all(base, family, root))


def _input_ids(base: PreTrainedModel, rows: int, seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, base.config.vocab_size, (rows, SEQ), generator=gen)  # [B, S]


KERNELS = [
    pytest.param("cpu", None, True, id="cpu"),
    pytest.param("cpu", None, False, id="cpu-shared-out"),
    pytest.param("cuda", None, True, marks=[pytest.mark.gpu, needs_cuda], id="cuda"),
    pytest.param("cpu", "triton", True, marks=[pytest.mark.triton, interpreted], id="cpu-triton-interpreted"),
]
"""(device, kernels (None: the device's), with mixtures). On CPU a step without mixtures is shared out
among the threads (the parallel kernel); one with them runs the grouped products on the caller."""
INTERPRETED_FAMILIES = ("llama",)
"""The interpreter is slow: the Triton kernels run against PEFT on one family (they see [T, in] rows only)."""


@pytest.mark.parametrize(("device", "kernels", "mixtures"), KERNELS)
def test_mixed_batch_equals_peft_per_adapter(
    setup: Setup, device: str, kernels: str | None, mixtures: bool
) -> None:
    """Against PEFT on the CPU, in fp32: on CPU (parallel kernels, grouped on the caller when the step
    has mixtures, and the Triton ones interpreted) and on CUDA (Triton)."""
    if kernels == "triton" and setup.family not in INTERPRETED_FAMILIES:
        pytest.skip(f"interpreted on {', '.join(INTERPRETED_FAMILIES)} only (time)")
    model = copy.deepcopy(setup.base).to(device)
    manager = AdapterManager(
        model, num_slots=len(setup.dirs), device=device, dtype=torch.float32, kernels=kernels
    )
    infos = {name: manager.register(name, path) for name, path in setup.dirs.items()}
    assert len(infos["lora-patterns"].ranks) == 3  # r=4, rank_pattern 2 and 6, no padding
    assert infos["adalora"].kind == "adalora" and len(infos["adalora"].ranks) >= 2  # pruned unevenly

    # Rows: each adapter alone, base rows between them, and weighted mixtures across kinds.
    names = list(setup.dirs)
    rows: list[tuple[tuple[str, float], ...]] = []
    for name in names:
        rows += [((name, 1.0),), ()]
    if mixtures:
        rows += [mixture for mixture in pf.MIXTURES if all(n in setup.dirs for n, _ in mixture)]
    ids = _input_ids(setup.base, len(rows))

    spans = []
    for row, refs in enumerate(rows):
        if refs:
            pairs = tuple((manager.acquire(name), w) for name, w in refs)
            spans.append((row * SEQ, SEQ, pairs))
    batch = manager.build_batch(spans, ids.numel())
    with torch.no_grad():
        manager.set_batch(batch)
        logits = model(input_ids=ids.to(device)).logits.cpu()  # [B, S, V]
        manager.set_batch(None)
        base_logits = copy.deepcopy(setup.base).to(device)(input_ids=ids.to(device)).logits.cpu()  # [B, S, V]

    for row, refs in enumerate(rows):
        if not refs:
            assert torch.equal(logits[row], base_logits[row]), f"base row {row} differs from the base model"
        elif len(refs) == 1:
            name = refs[0][0]
            expected = pf.peft_logits(setup.base, setup.dirs[name], ids[row : row + 1])[0]
            effect = (expected - base_logits[row]).abs().max().item()
            assert effect > 1e-2, f"{name}: adapter too weak to test anything ({effect})"
            err = (logits[row] - expected).abs().max().item()
            assert err <= TOL, f"{setup.family}/{name}: max |dlogits| {err} vs PEFT"
        else:
            merged = pf.merged_mixture(setup.base, [(setup.dirs[n], w) for n, w in refs])
            with torch.no_grad():
                expected = merged(input_ids=ids[row : row + 1]).logits[0]
            err = (logits[row] - expected).abs().max().item()
            assert err <= TOL, f"{setup.family}/mixture: max |dlogits| {err} vs merged weighted model"


def test_unset_batch_is_exactly_base(setup: Setup) -> None:
    model = copy.deepcopy(setup.base)
    manager = AdapterManager(model, num_slots=2, device="cpu", dtype=torch.float32)
    manager.register("a", setup.dirs["lora-patterns"])
    manager.acquire("a")
    ids = _input_ids(setup.base, 2)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, setup.base(input_ids=ids).logits)


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prefix_kv_matches_peft_get_prompt(family: str, projection: bool, tmp_path: Path) -> None:
    base, _ = build_tiny_model(family, seed=0)
    adapter_dir = pf.make_prefix(base, tmp_path / "prefix", projection)
    manager = AdapterManager(copy.deepcopy(base), num_slots=1, device="cpu", dtype=torch.float32)
    info = manager.register("p", adapter_dir)
    assert info.kind == "prefix" and info.num_virtual_tokens == 5
    assert manager.acquire("p") is None
    kv = manager.prefix_kv("p")  # [L, 2, kv_heads, nvt, head_dim]
    assert kv is not None

    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).eval()
    with torch.no_grad():
        cache = peft_model.get_prompt(batch_size=1)
    assert len(cache.layers) == kv.shape[0] == base.config.num_hidden_layers
    for layer_idx, layer in enumerate(cache.layers):
        assert layer.keys.shape[1:] == kv.shape[2:]  # [1, kv_heads, nvt, head_dim]
        assert torch.equal(layer.keys[0], kv[layer_idx, 0])
        assert torch.equal(layer.values[0], kv[layer_idx, 1])
