"""Decode steps replayed from graphs (runner/graphs.py) give the eager steps' tokens and logits.

On CPU the graphs' code runs with `capture_eagerly` (the static buffers, padding, the fixed-capacity
adapter plan and slot-table refresh) over the Triton kernels interpreted; the gpu test captures real
CUDA graphs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import AdapterRef, GenerationRequest, SamplingParams
from peftserve.errors import InvalidRequest
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts, run_recording
from tests.helpers.devices import interpreted, needs_cuda
from tests.helpers.tiny_models import tiny_config, tiny_tokenizer

pytest.importorskip("triton")

USES = {
    "base": (),
    "lora": (AdapterRef("lora"),),
    "mix": (AdapterRef("lora", 0.5), AdapterRef("other", -1.0)),
    "sparse": (AdapterRef("shira"),),
}


def _model() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A one-layer tiny Llama: the interpreter runs each kernel launch in Python."""
    tokenizer = tiny_tokenizer()
    config = tiny_config("llama", tokenizer)
    config.num_hidden_layers = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    base, _ = _model()
    return {
        "lora": pf.make_lora_patterns(base, "llama", root / "lora"),
        "other": pf.make_lora_patterns(base, "llama", root / "other", seed=11),
        "shira": pf.make_shira(base, "llama", root / "shira"),
        "dora": pf.make_dora(base, "llama", root / "dora"),
    }


def _engine(dirs: dict[str, Path], device: str, kernels: str | None) -> LLMEngine:
    model, tokenizer = _model()
    model.to(device)
    manager = AdapterManager(model, num_slots=len(dirs), device=device, dtype=torch.float32, kernels=kernels)
    for name, path in dirs.items():
        manager.register(name, path)
    config = EngineConfig(device=device, kv_cache_mb=1, block_size=4, max_batched_tokens=64, max_running=8)
    return LLMEngine.from_model(model, tokenizer, config, adapters=manager)


def _requests(vocab: int, uses: dict[str, tuple[AdapterRef, ...]]) -> list[GenerationRequest]:
    """The base request outlives the others: its last steps run a graph of one row and no adapter."""
    prompts = random_prompts([5, 9, 3, 12, 7], vocab, seed=3)
    return [
        GenerationRequest(
            f"{use}-{i}",
            prompt_token_ids=prompt,
            sampling=SamplingParams(max_new_tokens=6 if use == "base" else 4, ignore_eos=True),
            adapters=refs,
        )
        for i, ((use, refs), prompt) in enumerate(zip(uses.items(), prompts, strict=False))
    ]


def _compare(dirs: dict[str, Path], device: str, capture, uses=USES) -> tuple[int, int]:
    """Run the same requests without and with graphs; (replays, graphs captured)."""
    eager = _engine(dirs, device, kernels=None)
    graphed = _engine(dirs, device, kernels="triton")
    graphed.runner.enable_graphs(
        max_batch=4, max_context=graphed.max_context, max_mixture=2, max_rank=32, capture=capture
    )
    vocab = graphed.model_info.vocab_size
    expected = run_recording(eager, [_requests(vocab, uses)])
    got = run_recording(graphed, [_requests(vocab, uses)])
    for rid, rec in expected.items():
        assert got[rid].token_ids == rec.token_ids, rid
        torch.testing.assert_close(got[rid].logits, rec.logits, rtol=1e-5, atol=1e-5, msg=rid)
    return graphed.runner.graphs.replays, len(graphed.runner.graphs.graphs)


@pytest.mark.triton
@interpreted
def test_replayed_decode_steps_equal_eager_steps(adapter_dirs: dict[str, Path]) -> None:
    from peftserve.runner.graphs import capture_eagerly

    # prefill (eager), 3 decode steps of 4 rows with adapters, 2 of the base request alone
    assert _compare(adapter_dirs, "cpu", capture_eagerly) == (5, 2)


@pytest.mark.triton
@interpreted
def test_steps_with_other_forms_run_eagerly(adapter_dirs: dict[str, Path]) -> None:
    """DoRA's output scaling is not captured: every step holding it runs eagerly."""
    from peftserve.runner.graphs import capture_eagerly

    replays, _ = _compare(adapter_dirs, "cpu", capture_eagerly, {"dora": (AdapterRef("dora"),)})
    assert replays == 0


@pytest.mark.gpu
@needs_cuda
def test_cuda_graphs_equal_eager_steps(adapter_dirs: dict[str, Path]) -> None:
    from peftserve.runner.graphs import capture_cuda_graph

    assert _compare(adapter_dirs, "cuda", capture_cuda_graph) == (5, 2)
    assert _compare(adapter_dirs, "cuda", capture_cuda_graph, {"dora": (AdapterRef("dora"),)})[0] == 0


def test_buckets() -> None:
    from peftserve.runner.graphs import buckets

    assert buckets(64, 1) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(48, 1) == (1, 2, 4, 8, 16, 32, 48)
    assert buckets(1, 1) == (1,)


def test_cuda_graphs_need_cuda() -> None:
    with pytest.raises(InvalidRequest, match="CUDA"):
        EngineConfig(device="cpu", cuda_graphs=True)


def test_cuda_graphs_flag() -> None:
    from peftserve.cli import build_parser

    assert build_parser().parse_args(["serve", "--cuda-graphs", "on"]).cuda_graphs is True
    assert build_parser().parse_args(["serve"]).cuda_graphs is None  # EngineConfig's default: off
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--cuda-graphs", "yes"])
