"""Property tests of request conversion: any GenerateRequest either becomes a valid engine request or is
refused with InvalidRequest / AdapterNotFound (never another exception), and what the SDK sends is what
the engine gets."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from peftserve.api import adapter_ids, convert
from peftserve.auth.access import LOCAL_CALLER, Caller
from peftserve.engine.request import MAX_MIXTURE_WEIGHT, check_adapter_refs
from peftserve.errors import AdapterNotFound, InvalidRequest
from peftserve_client import _core
from peftserve_client._proto import peftserve_pb2 as pb

VOCAB = 320
MAX_NEW_TOKENS = 512
UINT32 = st.integers(0, 2**32 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
IDS = st.one_of(
    st.text(max_size=80),
    st.from_regex(r"([a-z0-9][a-z0-9._-]{0,8}/)?[a-z0-9][a-z0-9._-]{0,8}(@v[0-9]{1,3})?", fullmatch=True),
)


@st.composite
def sampling_messages(draw) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        stop=draw(
            st.lists(st.text(max_size=300), max_size=20)
            | st.lists(st.text(min_size=1, max_size=5), max_size=2)
        ),
        stop_token_ids=draw(st.lists(UINT32, max_size=70) | st.lists(st.integers(0, VOCAB - 1), max_size=3)),
        ignore_eos=draw(st.booleans()),
        logprobs=draw(st.booleans()),
    )
    # Each field: often a value in its valid range, else anything the wire type holds.
    for name, values in (
        ("max_new_tokens", st.one_of(st.integers(1, MAX_NEW_TOKENS), INT32)),
        ("temperature", st.one_of(st.floats(0, 4, width=32), FLOATS)),
        ("top_k", st.one_of(st.integers(0, 100), INT32)),
        ("top_p", st.one_of(st.floats(0.25, 1, width=32), FLOATS)),
        ("seed", st.integers(0, 2**64 - 1)),
        ("repetition_penalty", st.one_of(st.floats(0.5, 2, width=32), FLOATS)),
    ):
        if draw(st.booleans()):
            setattr(msg, name, draw(values))
    return msg


@st.composite
def generate_messages(draw) -> pb.GenerateRequest:
    tokens = draw(st.booleans())
    msg = pb.GenerateRequest(
        prompt="" if tokens else draw(st.text(max_size=50)),
        prompt_token_ids=draw(st.lists(UINT32, max_size=8)) if tokens else [],
        adapter_id=draw(st.one_of(st.just(""), IDS)),
        request_id=draw(st.text(max_size=200)),
    )
    msg.sampling.CopyFrom(draw(sampling_messages()))
    for _ in range(draw(st.integers(0, 10))):
        msg.adapters.add(adapter_id=draw(IDS), weight=draw(st.floats(-10, 10, width=32) | FLOATS))
    return msg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(generate_messages(), st.sampled_from([LOCAL_CALLER, Caller("acme")]))
def test_any_request_is_valid_or_refused_with_a_status(msg: pb.GenerateRequest, caller: Caller) -> None:
    # The wire round trip first: what the server decodes is what was encoded.
    msg = pb.GenerateRequest.FromString(msg.SerializeToString())
    try:
        request = convert.to_generation_request(
            msg, lambda text: adapter_ids.resolve(text, caller), caller.tenant
        )
        request.sampling.validate(MAX_NEW_TOKENS, VOCAB)
        check_adapter_refs(request.adapters)
    except (InvalidRequest, AdapterNotFound) as err:
        assert len(str(err)) < 1100  # a bounded message, whatever was sent
        event(f"refused: {type(err).__name__}")
        return
    event("accepted")
    params = request.sampling
    assert 0 < params.max_new_tokens <= MAX_NEW_TOKENS and params.temperature >= 0
    assert 0 < params.top_p <= 1 and params.top_k >= 0 and params.repetition_penalty > 0
    assert all(0 <= t < VOCAB for t in params.stop_token_ids)
    assert bool(request.prompt) != (request.prompt_token_ids is not None)
    assert len({r.adapter_id for r in request.adapters}) == len(request.adapters)
    for ref in request.adapters:
        assert math.isfinite(ref.weight) and abs(ref.weight) <= MAX_MIXTURE_WEIGHT
        tenant, _, rest = ref.adapter_id.partition("/")
        name = rest.partition("@")[0]
        assert tenant and name and "/" not in rest  # one separator: never a path below the store
        assert not tenant.startswith(".") and not name.startswith(".")  # so never '.' or '..'
        if not caller.local_mode:
            assert tenant == caller.tenant


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "max_new_tokens": st.integers(1, 4096),
            "temperature": st.floats(0, 5, width=32),
            "top_k": st.integers(0, 1000),
            "top_p": st.floats(0.25, 1, width=32),
            "seed": st.integers(0, 2**63 - 1),
            "repetition_penalty": st.floats(0.5, 2, width=32),
            "stop": st.lists(st.text(min_size=1, max_size=10), max_size=3),
            "ignore_eos": st.booleans(),
            "logprobs": st.booleans(),
            "adapters": st.dictionaries(
                st.from_regex(r"[a-z][a-z0-9]{0,6}", fullmatch=True), st.floats(-10, 10, width=32), max_size=3
            ),
        },
    )
)
def test_what_the_sdk_sends_is_what_the_engine_gets(options: dict) -> None:
    wire = _core.build_generate_request("hello", options).SerializeToString()
    request = convert.to_generation_request(
        pb.GenerateRequest.FromString(wire), lambda text: adapter_ids.resolve(text, LOCAL_CALLER)
    )
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "repetition_penalty"):
        if name in options:
            assert math.isclose(getattr(request.sampling, name), options[name], rel_tol=1e-6), name
    assert request.sampling.stop == tuple(options.get("stop", ()))
    want = {f"default/{k}": v for k, v in options.get("adapters", {}).items()}
    assert {r.adapter_id: r.weight for r in request.adapters}.keys() == want.keys()
    for ref in request.adapters:
        assert math.isclose(ref.weight, want[ref.adapter_id], rel_tol=1e-6, abs_tol=1e-30)
