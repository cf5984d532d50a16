"""Batch isolation: nothing computed for one request reaches another request's output.

A request whose values overflow (a hostile mixture weight, an adapter with extreme weights) ends with
an error of its own, and every other request in the same steps, before and after it, gets exactly
what it gets without it: base rows, other tenants' LoRA, prefix and sparse adapters, in decode and in
prefill. The input bounds refuse such requests at the door; these tests lift the bounds to prove the
engine itself keeps rows apart.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftserve.adapters.peft_format as peft_format
import peftserve.engine.request as engine_request
from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.prefix_cache import block_digests
from peftserve.engine.request import AdapterRef, FinishReason, GenerationRequest, SamplingParams
from peftserve.errors import NonFiniteOutput
from peftserve.model.families import FAMILIES
from peftserve.runner.kv_cache import kv_bytes_per_token
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts
from tests.helpers.tiny_models import build_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NEW_TOKENS = 12
VICTIMS = ("base", "lora", "prefix", "shira", "mix", "dora", "ia3", "loha", "lokr", "vera", "mix-kinds")
"""What the other requests use: base model, another tenant's LoRA, prefix tuning, a sparse delta, a
benign mixture (a LoRA and the sparse delta), each other served kind and a mixture across kinds."""
NEW_FAMILIES = ("gemma2", "gemma3_text", "olmo2", "olmo3", "mixtral", "qwen3_moe", "gpt_oss")
"""Soft-capping, sinks, windows per layer and experts: each new way a step's rows could meet."""
MOE_FAMILIES = tuple(f for f in NEW_FAMILIES if FAMILIES[f].moe)
FAMILY_VICTIMS = ("base", "lora", "prefix", "shira", "mix", "lora")
"""The victims on the other families: what their attention and experts add is family-specific, the
other kinds' layer forms are not (they run on Llama above); LoRA on the experts joins on MoE models."""


def victims(family: str) -> tuple[str, ...]:
    if family == "llama":
        return VICTIMS
    return FAMILY_VICTIMS + (("experts",) if FAMILIES[family].moe else ())


@pytest.fixture(scope="module")
def family_adapter_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Path]]:
    """family -> its adapters (built once per module)."""
    cache: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in cache:
            cache[family] = build_adapter_dirs(family, tmp_path_factory.mktemp(f"isolation-{family}"))
        return cache[family]

    return get


@pytest.fixture(scope="module")
def adapter_dirs(family_adapter_dirs: Callable[[str], dict[str, Path]]) -> dict[str, Path]:
    return family_adapter_dirs("llama")


def build_adapter_dirs(family: str, root: Path) -> dict[str, Path]:
    base, _ = build_tiny_model(family)
    dirs = {
        "lora": pf.make_lora_patterns(base, family, root / "lora"),
        "prefix": pf.make_prefix(base, root / "prefix", projection=False),
        "shira": pf.make_shira(base, family, root / "shira"),
        "other": pf.make_lora_layers(base, family, root / "other"),
    }
    if family == "llama":
        dirs["dora"] = pf.make_dora(base, family, root / "dora")
        dirs["ia3"] = pf.make_ia3(base, family, root / "ia3")
        dirs["loha"] = pf.make_loha(base, family, root / "loha")
        dirs["lokr"] = pf.make_lokr(base, family, root / "lokr")
        dirs["vera"] = pf.make_vera(base, family, root / "vera")
    if FAMILIES[family].moe:
        dirs["experts"] = pf.make_expert_lora(base, family, root / "experts")
    dirs["poisoned"] = poison(dirs["other"], root / "poisoned")
    if FAMILIES[family].moe:
        dirs["poisoned-experts"] = poison(dirs["experts"], root / "poisoned-experts")
    return dirs


def poison(source: Path, out: Path) -> Path:
    """A copy of a LoRA folder whose lora_B are all 1e38: finite, below float32's largest number (even
    times its scaling), and overflowing the first activation they touch."""
    shutil.copytree(source, out)
    state = load_file(out / "adapter_model.safetensors")
    for key in state:
        if key.endswith("lora_B.weight"):
            state[key] = torch.full_like(state[key], 1e38)
    save_file(state, out / "adapter_model.safetensors")
    return out


def kv_mb(family: str, llama_mb: float) -> float:
    """The cache size that holds as many blocks for `family` as `llama_mb` holds for the tiny Llama."""
    per_token = {f: kv_bytes_per_token_of(build_tiny_model(f)[0].config) for f in ("llama", family)}
    return llama_mb * per_token[family] / per_token["llama"]


def kv_bytes_per_token_of(config) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_bytes_per_token(config.num_hidden_layers, config.num_key_value_heads, head_dim, torch.float32)


@pytest.fixture
def no_input_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the hostile inputs in, as if the bounds at the door had a hole."""
    monkeypatch.setattr(peft_format, "MAX_MAGNITUDE", math.inf)
    monkeypatch.setattr(engine_request, "MAX_MIXTURE_WEIGHT", math.inf)


def make_engine(dirs: dict[str, Path], family: str = "llama", **config) -> LLMEngine:
    model, tokenizer = build_tiny_model(family)
    manager = AdapterManager(model, num_slots=len(dirs), device="cpu", dtype=torch.float32)
    for name, path in dirs.items():
        manager.register(name, path)
    config = {"kv_cache_mb": 1, "block_size": 4, "max_batched_tokens": 40, **config}
    return LLMEngine.from_model(model, tokenizer, EngineConfig(**config), adapters=manager)


def adapters_of(use: str) -> tuple[AdapterRef, ...]:
    if use == "base":
        return ()
    if use == "mix":
        return (AdapterRef("lora", 0.6), AdapterRef("shira", 0.4))
    if use == "mix-kinds":
        return (
            AdapterRef("dora", 0.5),
            AdapterRef("ia3", 0.7),
            AdapterRef("vera", -0.4),
            AdapterRef("lokr", 0.3),
        )
    if use == "mixture-poison":
        return (AdapterRef("other", 3e38), AdapterRef("lora", 1.0))
    if use == "adapter-poison":
        return (AdapterRef("poisoned"),)
    if use == "experts-poison":
        return (AdapterRef("poisoned-experts"),)
    return (AdapterRef(use),)


def make_request(rid: str, use: str, prompt: list[int]) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True, logprobs=True)
    return GenerationRequest(rid, prompt_token_ids=prompt, sampling=params, adapters=adapters_of(use))


def run_waves(engine: LLMEngine, waves: list[list[GenerationRequest]], every: int = 3) -> dict[str, dict]:
    """Add wave i after i * `every` steps and run everything to the end: {request_id: result}."""
    results = {r.request_id: {"tokens": [], "logprobs": [], "finish": None} for w in waves for r in w}
    step = 0
    while step <= every * (len(waves) - 1) or engine.has_unfinished():
        if step % every == 0 and step // every < len(waves):
            for r in waves[step // every]:
                engine.add_request(r)
        for out in engine.step():
            res = results[out.request_id]
            res["tokens"] += out.token_ids
            res["logprobs"] += out.logprobs or ()
            if out.finished:
                res["finish"] = out.finish_reason
                res["error"] = out.error
        step += 1
    return results


def victims_wave(tag: str, seed: int, family: str = "llama") -> list[GenerationRequest]:
    uses = victims(family)
    prompts = random_prompts([3 + 4 * i for i in range(len(uses))], 320, seed=seed)
    pairs = enumerate(zip(uses, prompts, strict=True))
    return [make_request(f"{tag}{i}-{use}", use, p) for i, (use, p) in pairs]


OVERFLOWS = [
    ("llama", "mixture-poison"),
    ("llama", "adapter-poison"),
    *(
        pytest.param(f, p, marks=pytest.mark.slow)
        for f in MOE_FAMILIES
        for p in ("adapter-poison", "experts-poison")
    ),
]
"""On mixture-of-experts models a row of NaN or Inf also goes through the router and the experts."""


@pytest.mark.parametrize(("family", "poison"), OVERFLOWS)
def test_an_overflowing_request_fails_alone(family_adapter_dirs, no_input_bounds, family, poison) -> None:
    # Wave 0: victims and a poisoned request prefill together. Wave 1 (3 steps later): new victims
    # prefill while the first poison decodes, and a second poison prefills while victims decode.
    # Wave 2: victims run on blocks the poisoned requests wrote and freed.
    adapter_dirs = family_adapter_dirs(family)
    poisons = [make_request(f"poison{i}", poison, p) for i, p in enumerate(random_prompts([9, 17], 320))]
    waves = [victims_wave(tag, seed, family) for tag, seed in (("a", 1), ("b", 2), ("c", 3))]
    clean = run_waves(make_engine(adapter_dirs, family), waves)
    engine = make_engine(adapter_dirs, family)
    dirty = run_waves(engine, [waves[0] + poisons[:1], waves[1] + poisons[1:], waves[2]])

    for p in poisons:
        assert dirty[p.request_id]["finish"] is FinishReason.ERROR, "the poison did not overflow"
        assert isinstance(dirty[p.request_id]["error"], NonFiniteOutput)
        assert "NaN or Inf" in str(dirty[p.request_id]["error"])
    for rid, want in clean.items():
        got = dirty[rid]
        assert got["finish"] is FinishReason.LENGTH, rid
        assert got["tokens"] == want["tokens"], rid
        assert all(math.isfinite(x) for x in got["logprobs"]), rid
        assert max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"], strict=True)) <= 1e-4, rid
    assert engine.stats().kv_blocks_used == 0


def poison_unwritten_slots(engine: LLMEngine) -> int:
    """Fill every KV slot with NaN that is neither a running sequence's computed entry nor in a cached
    block some waiting or running sequence may find (its own identity and tokens); returns how many."""
    cache = engine.runner.cache
    pool = engine.scheduler.allocator
    bs = cache.block_size
    live = torch.zeros(cache.null_slot + 1, dtype=torch.bool)
    live[cache.null_slot] = True  # the null slot is never written; it stays zero
    sequences = [*engine.scheduler.running, *engine.scheduler.waiting]
    for seq in engine.scheduler.running:
        for pos in range(seq.num_computed):
            live[seq.blocks[pos // bs] * bs + pos % bs] = True
    findable = {d for seq in sequences for d in block_digests(seq, seq.kv_len // bs, bs)}
    for block in range(pool.num_blocks):
        if pool.digest_of(block) in findable:
            live[block * bs : (block + 1) * bs] = True
    dead = (~live).nonzero()[:, 0]
    cache.keys[:, dead] = float("nan")
    cache.values[:, dead] = float("nan")
    return dead.numel()


@pytest.mark.parametrize(
    "family", ["llama", *(pytest.param(f, marks=pytest.mark.slow) for f in NEW_FAMILIES)]
)
def test_no_step_reads_a_slot_outside_its_own_context(family_adapter_dirs, family) -> None:
    """By construction: free blocks, unwritten slots, padding and other identities' cached blocks may
    hold anything at all.

    Before every step every KV slot that is not a running sequence's computed entry, nor in a cached
    block of a waiting or running sequence's own prefix, is set to NaN; a run with late joiners, chunked
    prefill and preemption (readmitted sequences find their own blocks) over every adapter kind is then
    identical, bit for bit, to the same run without it. The families this runs on add soft-capped and
    sink attention, windows per layer and experts to Llama's paths.
    """
    waves = [victims_wave(tag, seed, family) for tag, seed in (("a", 4), ("b", 5), ("c", 6))]
    # Llama: 0.03 MB, 15 blocks of 4 tokens (512 bytes a token) for 33 requests of up to 55 tokens. The
    # other families: 10 blocks of Llama's size for 18 requests of up to 40 tokens, one more per victim
    # on MoE models. Either way sequences are preempted.
    mb = 0.03 if family == "llama" else kv_mb(family, 0.02 * len(victims(family)) / len(FAMILY_VICTIMS))
    config = {"kv_cache_mb": mb, "max_batched_tokens": 24}
    adapter_dirs = {k: v for k, v in family_adapter_dirs(family).items() if not k.startswith("poisoned")}
    clean_engine = make_engine(adapter_dirs, family, **config)
    clean = run_waves(clean_engine, waves)
    assert clean_engine.scheduler.num_preemptions > 0

    engine = make_engine(adapter_dirs, family, **config)
    poisoned_slots = []
    real_step = engine.step

    def poisoned_step():
        poisoned_slots.append(poison_unwritten_slots(engine))
        return real_step()

    engine.step = poisoned_step
    dirty = run_waves(engine, waves)
    # Some steps find every block in use or findable: nothing to poison then, but most steps have some.
    assert sum(n > 0 for n in poisoned_slots) > 0.75 * len(poisoned_slots)
    assert engine.scheduler.num_preemptions == clean_engine.scheduler.num_preemptions
    for rid, want in clean.items():
        assert dirty[rid]["tokens"] == want["tokens"], rid
        assert dirty[rid]["logprobs"] == want["logprobs"], rid


def test_a_request_whose_adapter_finds_no_slot_waits_and_the_batch_carries_on(
    adapter_dirs, monkeypatch
) -> None:
    """Should the slots ever disagree with the scheduler's slot budget, only that request waits."""
    dirs = {k: adapter_dirs[k] for k in ("lora", "other")}
    prompts = random_prompts([6, 9, 5], 320, seed=8)
    requests = [make_request("lora", "lora", prompts[0]), make_request("base", "base", prompts[2])]
    requests.append(make_request("other", "other", prompts[1]))
    alone = {r.request_id: make_engine(dirs).generate_all([r])[r.request_id].token_ids for r in requests}

    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=1, device="cpu", dtype=torch.float32)
    for name, path in dirs.items():
        manager.register(name, path)
    engine = LLMEngine.from_model(
        model, tokenizer, EngineConfig(kv_cache_mb=1, block_size=4), adapters=manager
    )
    monkeypatch.setattr(engine.scheduler, "_slots_allow", lambda seq: True)  # a budget that overcommits
    done = engine.generate_all(requests)
    assert {rid: c.token_ids for rid, c in done.items()} == alone
    assert engine.scheduler.num_preemptions == 0 and engine.stats().kv_blocks_used == 0


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routing_and_experts_are_per_row(family: str) -> None:
    """No capacity limit, no batch statistic: other rows' values never reach a row's routing or experts.

    The router's choice for our rows is bitwise the same when the other rows turn NaN or 1e30; with the
    routing held, so is the experts module's output for our rows. Through the whole model, NaN and Inf
    in other rows never reach row 0; only its rounding may move (1e-7), because other rows' routing sets
    how many tokens share each expert's GEMM, as a batch's size does for any matmul.
    """
    model, _ = build_tiny_model(family)
    mlp = next(layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "experts"))
    router = mlp.router if family == "gpt_oss" else mlp.gate
    hidden = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))  # [T, H]
    poisoned = hidden.clone()
    poisoned[6:9], poisoned[9:] = float("nan"), 1e30
    with torch.no_grad():
        _, weights, index = router(hidden)  # [T, k] each
        _, weights_p, index_p = router(poisoned)
        assert torch.equal(index_p[:6], index[:6]) and torch.equal(weights_p[:6], weights[:6])
        out = mlp.experts(hidden, index, weights)  # [T, H]
        out_p = mlp.experts(poisoned, index, weights)
        assert not torch.isfinite(out_p[6:]).all()
        assert torch.equal(out_p[:6], out[:6])

        ids = torch.randint(3, 320, (3, 10), generator=torch.Generator().manual_seed(1))  # [B, S]
        embeds = model.get_input_embeddings()(ids)  # [B, S, H]
        clean = model(inputs_embeds=embeds).logits
        embeds[1], embeds[2] = float("nan"), 1e30
        dirty = model(inputs_embeds=embeds).logits
    assert not torch.isfinite(dirty[1:]).all()
    assert torch.isfinite(dirty[0]).all()
    torch.testing.assert_close(dirty[0], clean[0], atol=1e-5, rtol=0)
