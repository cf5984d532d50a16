"""The served adapter kinds: one line each. A kind is its folder (its loader) plus its line here.

A kind names the peft_type it reads (and, when several kinds share one, the config flag that tells
them apart) and the compute forms its deltas use; every layer holds one instance of each form named
here. A kind with a new way of computing adds a Form (forms/) and names it on its line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .adalora import load_adalora
from .dora import load_dora, uses_dora
from .forms import (
    DenseForm,
    Form,
    InputScaleForm,
    KroneckerForm,
    LowRankForm,
    OutputScaleForm,
    ProjectedForm,
    SparseForm,
)
from .ia3 import load_ia3
from .loha import load_loha
from .lokr import load_lokr
from .lora import load_lora
from .normalized import NormalizedAdapter
from .peft_format import Config, Tensors
from .prefix import load_prefix
from .sparse import load_shira
from .vera import load_vera

Loader = Callable[[Config, Tensors], NormalizedAdapter]


@dataclass(frozen=True)
class Kind:
    name: str
    peft_type: str
    load: Loader
    forms: tuple[type[Form], ...]
    """The forms its deltas are computed by (none for prefix tuning: its K/V go into the cache)."""
    applies: Callable[[Config], bool] = lambda config: True
    """Whether a directory of this peft_type is this kind (the first kind that applies loads it)."""


KINDS: tuple[Kind, ...] = (
    Kind("dora", "LORA", load_dora, (LowRankForm, OutputScaleForm), applies=uses_dora),
    Kind("lora", "LORA", load_lora, (LowRankForm,)),
    Kind("adalora", "ADALORA", load_adalora, (LowRankForm,)),
    Kind("ia3", "IA3", load_ia3, (InputScaleForm, OutputScaleForm)),
    Kind("loha", "LOHA", load_loha, (LowRankForm, DenseForm)),
    Kind("lokr", "LOKR", load_lokr, (KroneckerForm, DenseForm)),
    Kind("vera", "VERA", load_vera, (ProjectedForm,)),
    Kind("sparse", "SHIRA", load_shira, (SparseForm,)),
    Kind("prefix", "PREFIX_TUNING", load_prefix, ()),
)

FORMS: tuple[type[Form], ...] = tuple(dict.fromkeys(form for kind in KINDS for form in kind.forms))
"""Every form some kind uses, in a fixed order: the forms each MultiAdapterLayer holds."""

KIND_NAMES: tuple[str, ...] = tuple(kind.name for kind in KINDS)
PEFT_TYPES: tuple[str, ...] = tuple(dict.fromkeys(kind.peft_type for kind in KINDS))


def kind_for(config: Config) -> Kind | None:
    """The kind that serves a directory with this adapter_config, or None when none does."""
    peft_type = config.get("peft_type")
    return next((k for k in KINDS if k.peft_type == peft_type and k.applies(config)), None)
