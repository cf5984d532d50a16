"""The demo adapters, trained on the embedded default model, answer as their own tenant in one mixed batch."""

from __future__ import annotations

import pytest

from peftserve.engine.request import FinishReason
from peftserve.model.default_model import ensure_default_model
from peftserve.training.demo import ANSWERS, DEMO_SPECS, QUESTIONS, prompt_of, train_demo_adapters

from .serving import ask_all, engine_with


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = ensure_default_model()
    out = tmp_path_factory.mktemp("store")
    return base, out, train_demo_adapters(base, out)


def test_demo_covers_two_tenants_with_lora_and_sparse_adapters(demo):
    _, out, adapters = demo
    assert {a.tenant for a in adapters} == {"acme", "globex"}
    assert {a.method for a in adapters} >= {"lora", "sparse"}
    assert [a.path for a in adapters] == [out / s.tenant / s.name for s in DEMO_SPECS]
    assert adapters[0].adapter_id == "acme/support-lora"


@pytest.mark.slow
def test_each_demo_adapter_answers_with_its_tenants_completion_in_one_batch(demo):
    base, _, adapters = demo
    engine = engine_with(base, {a.adapter_id: a.path for a in adapters})
    questions = {
        f"{a.adapter_id}|{i}": (a.adapter_id, prompt_of(q)) for a in adapters for i, q in enumerate(QUESTIONS)
    }
    done = ask_all(engine, questions)
    for rid in questions:
        adapter_id, i = rid.split("|")
        want = " " + ANSWERS[adapter_id.split("/")[0]][int(i)]
        assert (done[rid].text, done[rid].finish_reason) == (want, FinishReason.EOS), rid


def test_trained_adapters_are_reused(demo):
    base, out, adapters = demo
    stamps = {a.path: (a.path / "adapter_model.safetensors").stat().st_mtime_ns for a in adapters}
    again = train_demo_adapters(base, out)  # would take ~30 s if it trained
    assert again == adapters
    assert stamps == {a.path: (a.path / "adapter_model.safetensors").stat().st_mtime_ns for a in again}
