"""AdaLoRA through peft, with its rank budget schedule fitted to the run length."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import AdaLoraConfig, PeftModel
from transformers import PreTrainedModel

from peftserve.errors import InvalidRequest
from peftserve.training.config import AdaLoraOptions

from .base import BuildContext, MethodState, TrainingMethod, number, target_modules, wrap

log = logging.getLogger(__name__)

ALLOCATOR_STATES = ("ipt", "exp_avg_ipt", "exp_avg_unc")
"""RankAllocator's per-parameter importance tensors (sensitivity, its EMA, the uncertainty EMA)."""


@dataclass(frozen=True)
class AdaLoraSchedule:
    """peft's three phases: tinit steps at full rank, pruning every delta_t steps, tfinal steps at the end."""

    total_step: int
    tinit: int
    tfinal: int
    delta_t: int
    derived: tuple[str, ...]
    """The fields computed from the run length rather than given."""


def adalora_schedule(options: AdaLoraOptions, total_steps: int) -> AdaLoraSchedule:
    """Fill unset tinit/tfinal/delta_t from the run length (10% / 20% / a tenth of the pruning span).

    peft requires tinit < total_step - tfinal (a pruning phase of at least one step); a derived value
    gives way to a given one, two given values that leave no pruning phase are an error.
    """
    if total_steps < 2:
        raise InvalidRequest(
            f"AdaLoRA needs at least 2 optimizer steps to prune ranks, the run has {total_steps}"
        )
    tinit = options.tinit if options.tinit is not None else total_steps // 10
    tfinal = options.tfinal if options.tfinal is not None else max(1, total_steps // 5)
    derived = [name for name in ("tinit", "tfinal") if getattr(options, name) is None]
    if tinit >= total_steps - tfinal:
        if "tfinal" in derived and tinit < total_steps - 1:
            tfinal = total_steps - tinit - 1
        elif "tinit" in derived and tfinal < total_steps - 1:
            tinit = total_steps - tfinal - 1
        else:
            raise InvalidRequest(
                f"AdaLoRA schedule leaves no pruning phase: tinit={tinit} must be < total_step - tfinal = "
                f"{total_steps} - {tfinal} (total_step is the run's optimizer steps); lower --tinit/--tfinal "
                "or train longer"
            )
    delta_t = options.delta_t or max(1, (total_steps - tfinal - tinit) // 10)
    if options.delta_t is None:
        derived.append("delta_t")
    return AdaLoraSchedule(total_steps, tinit, tfinal, delta_t, tuple(derived))


class AdaLoraMethod(TrainingMethod[AdaLoraOptions]):
    """peft's AdaLoRA; update_and_allocate(step) after every optimizer step drives the rank budget."""

    def build(self, base: PreTrainedModel, context: BuildContext) -> PeftModel:
        options = self.options
        schedule = adalora_schedule(options, context.total_steps)
        log.info(
            "AdaLoRA schedule over %d steps: tinit=%d tfinal=%d deltaT=%d, rank %d -> %d%s",
            schedule.total_step,
            schedule.tinit,
            schedule.tfinal,
            schedule.delta_t,
            options.init_r,
            options.target_r,
            f" ({', '.join(schedule.derived)} derived from the run length)" if schedule.derived else "",
        )
        if schedule.tfinal == 0:
            log.warning(
                "AdaLoRA tfinal=0: the final rank budget is never enforced (peft forces it at total - tfinal)"
            )
        config = AdaLoraConfig(
            task_type="CAUSAL_LM",
            init_r=options.init_r,
            target_r=options.target_r,
            lora_alpha=number(options.alpha),
            lora_dropout=options.dropout,
            target_modules=target_modules(options.target_modules),
            tinit=schedule.tinit,
            tfinal=schedule.tfinal,
            deltaT=schedule.delta_t,
            total_step=schedule.total_step,
            beta1=options.beta1,
            beta2=options.beta2,
            orth_reg_weight=options.orth_reg_weight,
        )
        return wrap(base, config, "adalora")

    def after_optimizer_step(self, model: PeftModel, step: int) -> None:
        model.base_model.update_and_allocate(step)

    def state(self, model: PeftModel) -> MethodState:
        allocator = model.base_model.rankallocator
        tensors = {
            f"{kind}/{name}": value.detach()
            for kind in ALLOCATOR_STATES
            for name, value in getattr(allocator, kind).items()
        }
        return MethodState(tensors, {"rank_pattern": model.peft_config["default"].rank_pattern})

    def load_state(self, model: PeftModel, state: MethodState) -> None:
        allocator = model.base_model.rankallocator
        allocator.reset_ipt()
        for key, value in state.tensors.items():
            kind, _, name = key.partition("/")
            getattr(allocator, kind)[name] = value
        model.peft_config["default"].rank_pattern = state.meta.get("rank_pattern")
