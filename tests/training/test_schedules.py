"""AdaLoRA's budget schedule fitted to the run length, and the learning-rate schedule."""

from __future__ import annotations

import pytest

from peftserve.errors import InvalidRequest
from peftserve.training import AdaLoraOptions
from peftserve.training.loop import Schedule
from peftserve.training.methods.adalora import adalora_schedule


def test_defaults_come_from_the_run_length():
    schedule = adalora_schedule(AdaLoraOptions(), 100)
    assert (schedule.tinit, schedule.tfinal, schedule.delta_t) == (10, 20, 7)
    assert schedule.derived == ("tinit", "tfinal", "delta_t")
    short = adalora_schedule(AdaLoraOptions(), 3)
    assert short.tinit < short.total_step - short.tfinal  # peft's condition: a pruning phase exists


def test_a_derived_value_gives_way_to_a_given_one():
    schedule = adalora_schedule(AdaLoraOptions(tinit=45), 50)
    assert (schedule.tinit, schedule.tfinal, schedule.derived) == (45, 4, ("tfinal", "delta_t"))
    schedule = adalora_schedule(AdaLoraOptions(tfinal=48), 50)
    assert (schedule.tinit, schedule.tfinal) == (1, 48)


def test_given_values_without_a_pruning_phase_are_an_error():
    with pytest.raises(InvalidRequest, match=r"tinit=30 must be < total_step - tfinal = 50 - 20"):
        adalora_schedule(AdaLoraOptions(tinit=30, tfinal=20), 50)
    with pytest.raises(InvalidRequest, match="at least 2 optimizer steps"):
        adalora_schedule(AdaLoraOptions(), 1)


def test_learning_rate_warms_up_then_decays_linearly_or_holds():
    linear = Schedule(total_steps=10, peak_lr=1.0, warmup_steps=2)
    assert [round(linear.lr(s), 3) for s in range(10)] == [
        0.5,
        1.0,
        1.0,
        0.875,
        0.75,
        0.625,
        0.5,
        0.375,
        0.25,
        0.125,
    ]
    constant = Schedule(total_steps=10, peak_lr=1.0, kind="constant")
    assert {constant.lr(s) for s in range(10)} == {1.0}
