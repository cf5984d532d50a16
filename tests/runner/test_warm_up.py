"""The runner's warm-up: attention compiled in place and the Linear weights packed, before the engine
serves or beside it (EngineConfig.warm_up), with the same outputs either way."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from peftserve.adapters.forms import low_rank, low_rank_rows
from peftserve.adapters.manager import AdapterManager
from peftserve.config import EngineConfig
from peftserve.engine.engine import LLMEngine
from peftserve.engine.request import GenerationRequest, SamplingParams
from peftserve.errors import InvalidRequest
from peftserve.runner import model_runner, paged_kernel
from peftserve.runner.linear import pack_linears
from peftserve.runner.model_runner import ModelRunner, attention_calls
from tests.adapters import peft_factory as pf
from tests.engine.conftest import random_prompts
from tests.engine.test_adapter_fidelity import make_adapters, reference_model, reference_run, requests_for
from tests.helpers.tiny_models import build_tiny_model

PARAMS = SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True)


def _requests(tag: str, seed: int) -> list[GenerationRequest]:
    """A chunked, mixed workload whose contexts span many blocks, with a lone decode at its tail."""
    prompts = random_prompts([1, 9, 16, 23, 5], 320, seed=seed)
    return [
        GenerationRequest(f"{tag}{i}", prompt_token_ids=p, sampling=PARAMS) for i, p in enumerate(prompts)
    ]


def _engine(warm_up: str, family: str = "llama", attention: str = "flex") -> LLMEngine:
    model, tokenizer = build_tiny_model(family)
    config = EngineConfig(
        kv_cache_mb=1, block_size=4, max_batched_tokens=20, attention=attention, warm_up=warm_up
    )
    return LLMEngine.from_model(model, tokenizer, config)


def _plain_linears(engine: LLMEngine) -> list[str]:
    return [
        name
        for name, m in engine.runner.model.named_modules()
        if type(m) is nn.Linear and m.weight is not None
    ]


@pytest.mark.parametrize(
    ("family", "warm_up"),
    [
        ("llama", "before"),
        ("llama", "background"),
        ("gpt2", "before"),  # plain multi-head attention: a query of other strides than grouped heads'
        pytest.param("gemma2", "before", marks=pytest.mark.slow),  # soft-capping, windows on half the layers
    ],
)
def test_once_warm_serving_compiles_nothing(family, warm_up):
    """The warm-up compiles attention once per call the layers make, as the steps call it (inference
    mode, a token count that stays dynamic), in its own thread: serving a workload with lone decode rows
    compiles nothing more, and every Linear but the tied output head is packed."""
    torch._dynamo.reset()  # forget the graphs earlier tests compiled: only the warm-up's count
    counters.clear()
    engine = _engine(warm_up, family)
    assert engine.runner.wait_warm_up(timeout=300)
    assert counters["stats"]["unique_graphs"] == len(attention_calls(engine.runner.model)) == 1
    with torch._dynamo.config.patch(error_on_recompile=True):
        done = engine.generate_all(_requests("r", seed=12))
        alone = engine.generate_all([GenerationRequest("alone", prompt_token_ids=[5, 6, 7], sampling=PARAMS)])
    assert engine.runner.in_place and engine.runner.warming == ()
    assert all(len(out.token_ids) == 12 for out in [*done.values(), *alone.values()])
    tied = {"lm_head"} if engine.runner.model.config.tie_word_embeddings else set()
    assert set(_plain_linears(engine)) == tied


def test_attention_calls_read_each_layers_scaling_and_soft_cap():
    model, _ = build_tiny_model("gemma2")
    config = model.config
    assert attention_calls(model) == {(config.query_pre_attn_scalar**-0.5, config.attn_logit_softcapping)}


def test_in_the_background_steps_serve_before_the_warm_up_ends_and_after_with_the_same_tokens(monkeypatch):
    """While attention compiles, steps gather and run whatever weights are packed; once it is done, the
    next step reads in place. Both give the tokens of an engine warmed up before serving, and log-
    probabilities within fp32 rounding."""
    want = {
        **_engine("before").generate_all(_requests("a", 1)),
        **_engine("before").generate_all(_requests("b", 2)),
    }
    release = threading.Event()
    compile_attention = ModelRunner._compile_attention

    def held(self):
        assert release.wait(timeout=60)
        compile_attention(self)

    monkeypatch.setattr(ModelRunner, "_compile_attention", held)
    engine = _engine("background")
    got = engine.generate_all(_requests("a", 1))
    assert not engine.runner.in_place and "attention" in engine.runner.warming
    assert engine.stats().warming == len(engine.runner.warming) >= 1
    release.set()
    assert engine.runner.wait_warm_up(timeout=300)
    got |= engine.generate_all(_requests("b", 2))
    assert engine.runner.in_place and engine.runner.warming == () and _plain_linears(engine) == []
    assert engine.stats().warming == 0
    for rid, out in want.items():
        assert got[rid].token_ids == out.token_ids, rid
        assert max(abs(a - b) for a, b in zip(got[rid].logprobs, out.logprobs, strict=True)) <= 1e-5, rid


def test_a_failed_warm_up_stops_the_start_before_serving_and_is_left_out_in_the_background(
    monkeypatch, caplog
):
    def broken(self):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(ModelRunner, "_compile_attention", broken)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        _engine("before")
    engine = _engine("background")
    assert engine.runner.wait_warm_up(timeout=300)
    with caplog.at_level(logging.WARNING, logger="peftserve.runner.model_runner"):
        done = engine.generate_all(_requests("r", seed=3))
    assert "warm-up: attention failed" in caplog.text and "no C++ compiler" in caplog.text
    assert "serving on without attention (its warm-up failed)" in caplog.text
    assert not engine.runner.in_place and engine.runner.warming == ()
    assert _plain_linears(engine) == []  # packing, which did not fail, is taken in
    assert all(len(out.token_ids) == 12 for out in done.values())


def test_nothing_to_warm_up_with_gathered_attention_and_plain_linears():
    model, tokenizer = build_tiny_model("llama")
    config = EngineConfig(kv_cache_mb=1, attention="sdpa", cpu_linear="torch", warm_up="background")
    engine = LLMEngine.from_model(model, tokenizer, config)
    assert engine.runner.warming == () and engine.runner.wait_warm_up(timeout=0)


def test_unknown_warm_up_is_rejected():
    with pytest.raises(InvalidRequest, match="warm_up must be one of background, before"):
        EngineConfig(warm_up="lazy")


def test_while_warming_up_a_mixed_adapter_batch_equals_peft_per_adapter(monkeypatch, tmp_path):
    """The fidelity invariant while the background warm-up runs: every kind of adapter, mixtures and
    base rows in one batch, stepped first on gathered attention, the parallel adapter kernel and plain
    weights, then in place with the rows kernel and one decoder layer packed, then warm: each request's
    logits equal PEFT's own forward within 1e-4 in fp32, its greedy tokens identical; base rows equal
    the base model."""
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(tmp_path / "kernels"))  # the rows kernel not yet built
    monkeypatch.setattr(low_rank_rows.KERNEL, "_loaded", {})  # nor loaded, as in a new process
    base, _ = build_tiny_model("llama")
    adapters = make_adapters(base, "llama", tmp_path)
    model, tokenizer = build_tiny_model("llama")
    manager = AdapterManager(model, num_slots=len(adapters), device="cpu", dtype=torch.float32)
    for adapter_id, path in adapters.items():
        manager.register(adapter_id, path)
    compiled, halfway, release = threading.Event(), threading.Event(), threading.Event()
    compile_attention, pack = ModelRunner._compile_attention, model_runner._pack

    def held_compile(self):
        assert compiled.wait(timeout=60)
        return compile_attention(self)

    def held_packing(model, stop):
        pack_linears(model.model.layers[0])
        halfway.set()
        assert release.wait(timeout=60)
        return pack(model, stop)

    fallbacks = []

    def counted(*args):
        fallbacks.append(len(fallbacks))
        return parallel(*args)

    parallel = low_rank.low_rank_parallel
    monkeypatch.setattr(low_rank, "low_rank_parallel", counted)

    monkeypatch.setattr(ModelRunner, "_compile_attention", held_compile)
    monkeypatch.setattr(model_runner, "_pack", held_packing)
    config = EngineConfig(
        kv_cache_mb=4, block_size=4, max_batched_tokens=64, attention="flex", warm_up="background"
    )
    engine = LLMEngine.from_model(model, tokenizer, config, adapters=manager)
    mixtures = [m for m in pf.MIXTURES if all(n in adapters for n, _ in m)]
    uses = [((name, 1.0),) for name in adapters] + [()] + mixtures
    requests = requests_for(uses, engine.model_info.vocab_size, new_tokens=12)
    for request in requests:
        engine.add_request(request)
    logits: dict[str, list[torch.Tensor]] = {r.request_id: [] for r in requests}
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    steps = 0
    while engine.has_unfinished():
        if steps == 0:  # gathered attention, the parallel adapter kernel, plain weights
            assert engine.runner.warming == ("attention", "adapter kernels", "packing")
            assert torch.float32 in low_rank_rows.building and len(_plain_linears(engine)) > 7
        if steps == 4:  # then attention in place, the rows kernel, one layer packed
            assert fallbacks, "decode rows ran the parallel kernel while the rows kernel was building"
            compiled.set()
            assert halfway.wait(timeout=300) and engine.runner.warming == ("packing",)
            fallbacks.clear()
        if steps == 8:
            release.set()
            assert engine.runner.wait_warm_up(timeout=300)
        outputs, step, output = engine.step_with_output()
        for rid, row in (output.logits_of(step) if output is not None else {}).items():
            logits[rid].append(row.clone())
        for out in outputs:
            tokens[out.request_id] += out.token_ids
        if steps == 4:
            assert engine.runner.in_place and not low_rank_rows.building and not fallbacks
        steps += 1
    assert steps > 9 and engine.runner.warming == () and _plain_linears(engine) == []
    for refs, request in zip(uses, requests, strict=True):
        rid = request.request_id
        want_tokens, want_logits = reference_run(
            reference_model(base, adapters, refs), request.prompt_token_ids, 12
        )
        assert tokens[rid] == want_tokens, rid
        err = (torch.stack(logits[rid]) - want_logits).abs().max().item()
        assert err <= (1e-5 if not refs else 1e-4), f"{rid}: max |Δlogit| {err:.2e}"


def test_engine_warmup_sends_no_request_while_the_runner_warms_up_in_the_background(monkeypatch):
    """Its request would run on the paths being replaced, and delay serving by its own time."""
    sent: list = []
    for warm_up, requests in (("background", 0), ("before", 1)):
        engine = _engine(warm_up)
        monkeypatch.setattr(engine, "generate_all", sent.append)
        engine.warmup()
        assert len(sent) == requests and engine.runner.background_warm_up == (warm_up == "background")
        assert engine.runner.wait_warm_up(timeout=300)


def test_the_warm_up_runs_on_the_engine_threads_whatever_another_thread_set():
    """A new thread starts with the thread count torch.set_num_threads last gave anywhere in the process
    (the adapters' helper threads set 1), and attention's graph is guarded on, and built for, the count:
    compiled on another count than the steps', it would be compiled again while serving."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    other = threading.Thread(target=torch.set_num_threads, args=(1,))
    other.start()
    other.join()
    try:
        torch._dynamo.reset()
        engine = _engine("background")
        assert engine.runner.wait_warm_up(timeout=300)
        with torch._dynamo.config.patch(error_on_recompile=True):
            done = engine.generate_all(_requests("t", seed=4))
        assert engine.runner.in_place and all(len(out.token_ids) == 12 for out in done.values())
    finally:
        torch.set_num_threads(threads)


def test_close_stops_packing_and_lets_the_rest_end(monkeypatch):
    """What exiting during the warm-up waits for: packing stops at once (the model keeps its plain
    weights, and serves), attention's compile runs to its end."""
    release = threading.Event()
    compile_attention = ModelRunner._compile_attention

    def held(self):
        assert release.wait(timeout=60)
        return compile_attention(self)

    monkeypatch.setattr(ModelRunner, "_compile_attention", held)
    engine = _engine("background")
    plain = len(_plain_linears(engine))
    engine.runner.close()
    release.set()
    assert engine.runner.wait_warm_up(timeout=300)
    done = engine.generate_all(_requests("c", seed=5))
    assert engine.runner.in_place and len(_plain_linears(engine)) == plain > 0
    assert all(len(out.token_ids) == 12 for out in done.values())


def test_the_attention_kernel_built_on_an_earlier_start_serves_from_the_first_step(tmp_path, monkeypatch):
    """With no built kernel on this machine the warm-up builds it (steps gather meanwhile, same tokens);
    a later start loads it at once: its first step reads the pools in place, with nothing to warm up
    but packing."""
    monkeypatch.setenv("PEFTSERVE_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setattr(paged_kernel.KERNEL, "_loaded", {})  # as in a new process
    release = threading.Event()
    build = paged_kernel.build

    def held(dtype):
        assert release.wait(timeout=60)
        return build(dtype)

    monkeypatch.setattr(paged_kernel, "build", held)
    first = _engine("background", attention="cpp")
    gathered = first.generate_all(_requests("a", 1))
    assert first.runner.in_place is None and "attention" in first.runner.warming
    release.set()
    assert first.runner.wait_warm_up(timeout=300)
    in_place = first.generate_all(_requests("b", 2))
    assert first.runner.in_place is paged_kernel.kernel_paged_attention
    assert any(p.name.startswith("paged-attention-float32-") for p in tmp_path.iterdir())

    monkeypatch.setattr(paged_kernel.KERNEL, "_loaded", {})
    monkeypatch.setattr(paged_kernel, "build", None)  # a later start must not build
    second = _engine("background", attention="cpp")
    assert second.runner.in_place is paged_kernel.kernel_paged_attention
    assert "attention" not in second.runner.warming
    again = second.generate_all([*_requests("a", 1), *_requests("b", 2)])
    for rid, out in again.items():
        want = (gathered | in_place)[rid]
        assert out.token_ids == want.token_ids, rid
        assert max(abs(a - b) for a, b in zip(out.logprobs, want.logprobs, strict=True)) <= 1e-5, rid
