"""Engine behaviour: KV exhaustion, sampling, stops, EOS, cancellation, validation."""

from __future__ import annotations

import pytest
import torch

from peftserve.engine.request import FinishReason, GenerationRequest, SamplingParams
from peftserve.errors import CapacityExceeded, InvalidRequest
from peftserve.runner.linear import PackedLinear
from tests.engine.conftest import random_prompts, reference_greedy, request


def test_kv_exhaustion_preempts_and_every_request_completes_correctly(make_engine):
    # 0.03 MB holds 30 blocks of 4 tokens: far less than 8 requests of ~40 tokens need at once.
    engine, reference, _ = make_engine(kv_cache_mb=0.03, max_batched_tokens=64)
    assert engine.model_info.kv_blocks_total < 40
    prompts = random_prompts([12, 20, 7, 25, 16, 3, 22, 10], engine.model_info.vocab_size, seed=1)
    done = engine.generate_all([request(str(i), p, max_new_tokens=20) for i, p in enumerate(prompts)])
    assert engine.scheduler.num_preemptions > 0
    for i, p in enumerate(prompts):
        assert done[str(i)].token_ids == reference_greedy(reference, p, 20), f"request {i}"
    assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_reproducible_whatever_the_batch(make_engine):
    engine, _, _ = make_engine()
    prompts = random_prompts([6, 11, 30], engine.model_info.vocab_size)
    params = dict(max_new_tokens=24, temperature=1.3, top_k=50, top_p=0.9, seed=1234)
    alone = engine.generate_all([request("a", prompts[0], **params)])["a"].token_ids
    crowd = engine.generate_all(
        [
            request("b", prompts[1], temperature=0.7, max_new_tokens=10),
            request("a", prompts[0], **params),
            request("c", prompts[2], temperature=1.0, seed=7, max_new_tokens=30),
        ]
    )
    assert crowd["a"].token_ids == alone
    other = engine.generate_all([request("a", prompts[0], **{**params, "seed": 99})])["a"].token_ids
    assert other != alone


def test_top_k_one_equals_greedy_and_logprobs_match_the_model(make_engine):
    engine, reference, _ = make_engine()
    prompt = random_prompts([9], engine.model_info.vocab_size)[0]
    greedy = engine.generate_all([request("g", prompt, max_new_tokens=8, logprobs=True)])["g"]
    topk1 = engine.generate_all([request("k", prompt, max_new_tokens=8, temperature=0.8, top_k=1, seed=1)])[
        "k"
    ]
    assert topk1.token_ids == greedy.token_ids
    ids = torch.tensor([prompt + greedy.token_ids])
    with torch.no_grad():
        logits = reference(ids).logits[0, len(prompt) - 1 : -1]
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(greedy.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(greedy.logprobs), want, atol=1e-5)


def test_repetition_penalty_changes_greedy_output_like_transformers(make_engine):
    engine, reference, _ = make_engine()
    prompt = random_prompts([10], engine.model_info.vocab_size, seed=5)[0]
    got = engine.generate_all([request("r", prompt, max_new_tokens=12, repetition_penalty=1.8)])[
        "r"
    ].token_ids
    ids = torch.tensor([prompt])
    want = reference.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=12,
        min_new_tokens=12,
        do_sample=False,
        repetition_penalty=1.8,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert got == want


def test_stop_string_ends_text_before_it_and_deltas_concatenate(make_engine):
    engine, _, tokenizer = make_engine()
    prompt = tokenizer("The quick brown fox")["input_ids"]
    full = engine.generate_all([request("f", prompt, max_new_tokens=30)])["f"]
    assert len(full.text) > 6, full.text
    stop = full.text[3:6]
    outs = []
    engine.add_request(request("s", prompt, max_new_tokens=30, stop=(stop,)))
    while engine.has_unfinished():
        outs += engine.step()
    text = "".join(o.text for o in outs)
    assert outs[-1].finish_reason is FinishReason.STOP
    assert text == full.text[: full.text.index(stop)]
    assert stop not in text


def test_eos_and_stop_token_ids_finish_the_request(make_engine):
    engine, _, _ = make_engine()
    prompt = random_prompts([8], engine.model_info.vocab_size, seed=2)[0]
    free = engine.generate_all([request("f", prompt, max_new_tokens=12)])["f"].token_ids
    target = free[5]
    first = free.index(target)
    stopped = engine.generate_all([request("s", prompt, max_new_tokens=12, stop_token_ids=(target,))])["s"]
    assert stopped.finish_reason is FinishReason.STOP and stopped.token_ids == free[: first + 1]
    engine.eos_ids = frozenset({target})
    eos = engine.generate_all([request("e", prompt, max_new_tokens=12, ignore_eos=False)])["e"]
    assert eos.finish_reason is FinishReason.EOS and eos.token_ids == free[: first + 1]
    length = engine.generate_all([request("l", prompt, max_new_tokens=12, ignore_eos=True)])["l"]
    assert length.finish_reason is FinishReason.LENGTH and len(length.token_ids) == 12


def test_abort_frees_blocks_and_others_finish(make_engine):
    engine, reference, _ = make_engine()
    prompts = random_prompts([20, 15], engine.model_info.vocab_size)
    engine.add_request(request("keep", prompts[0], max_new_tokens=10))
    engine.add_request(request("drop", prompts[1], max_new_tokens=50))
    tokens = [t for _ in range(2) for o in engine.step() if o.request_id == "keep" for t in o.token_ids]
    used = engine.stats().kv_blocks_used
    out = engine.abort("drop")
    assert out.finish_reason is FinishReason.CANCELLED
    assert engine.stats().kv_blocks_used < used
    while engine.has_unfinished():
        tokens += [t for o in engine.step() for t in o.token_ids]
    assert tokens == reference_greedy(reference, prompts[0], 10)
    assert engine.stats().kv_blocks_used == 0
    assert engine.abort("drop") is None


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be > 0"),
        (dict(max_new_tokens=-3), "max_new_tokens must be > 0"),
        (dict(max_new_tokens=10**6), "max_new_tokens must be <="),
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_p=1.5), "top_p must be in (0, 1]"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(stop=tuple(f"s{i}" for i in range(17))), "at most 16 stop strings"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    ],
)
def test_bad_sampling_parameters_are_invalid_requests(make_engine, overrides, message):
    engine, _, _ = make_engine()
    with pytest.raises(
        InvalidRequest, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
    ):
        engine.add_request(request("x", [5, 6, 7], **overrides))
    assert not engine.has_unfinished()


def test_bad_prompts_are_invalid_requests(make_engine):
    engine, _, _ = make_engine()
    ctx = engine.model_info.max_context
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        engine.add_request(GenerationRequest(request_id="e", prompt=""))
    with pytest.raises(InvalidRequest, match="shorten the prompt"):
        engine.add_request(request("long", [5] * ctx))
    with pytest.raises(InvalidRequest, match="lower max_new_tokens to at most 10"):
        engine.add_request(request("tight", [5] * (ctx - 10), max_new_tokens=11))
    with pytest.raises(InvalidRequest, match="outside the vocabulary"):
        engine.add_request(request("vocab", [5, 10**7]))


def test_full_queue_is_capacity_exceeded(make_engine):
    engine, _, _ = make_engine(max_queue=2)
    engine.add_request(request("a", [5, 6]))
    engine.add_request(request("b", [5, 6]))
    with pytest.raises(CapacityExceeded, match="queue is full"):
        engine.add_request(request("c", [5, 6]))


def test_text_prompt_is_tokenized_with_the_models_tokenizer(make_engine):
    engine, reference, tokenizer = make_engine()
    ids = tokenizer("hello world")["input_ids"]
    text = engine.generate_all(
        [
            GenerationRequest(
                request_id="t",
                prompt="hello world",
                sampling=SamplingParams(max_new_tokens=6, ignore_eos=True),
            )
        ]
    )["t"]
    assert text.prompt_tokens == len(ids)
    assert text.token_ids == reference_greedy(reference, ids, 6)


@pytest.mark.parametrize("cpu_linear", ["onednn", "torch"])
def test_cpu_linear_choice_and_exactness(make_engine, cpu_linear):
    engine, reference, _ = make_engine(cpu_linear=cpu_linear)
    model = engine.runner.model
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert bool(packed) == (cpu_linear == "onednn")
    if cpu_linear == "onednn":  # packing runs beside the warm-up, and is over before the first step
        head = model.get_output_embeddings()
        assert not [m for m in model.modules() if type(m) is torch.nn.Linear and m is not head]
    prompts = random_prompts([5, 19, 33], engine.model_info.vocab_size, seed=3)
    done = engine.generate_all([request(str(i), p, max_new_tokens=12) for i, p in enumerate(prompts)])
    for i, p in enumerate(prompts):
        assert done[str(i)].token_ids == reference_greedy(reference, p, 12)


def test_unknown_cpu_linear_is_rejected():
    from peftserve.config import EngineConfig

    with pytest.raises(InvalidRequest, match="cpu_linear must be one of onednn, torch"):
        EngineConfig(cpu_linear="mkl")
