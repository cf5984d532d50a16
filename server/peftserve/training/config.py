"""Frozen, validated configuration of a training run and of each adapter method (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from peftserve.errors import InvalidRequest

ALL_LINEAR = ("all-linear",)
"""peft's shorthand: every Linear of the model except the output head."""
SPARSE_RULES = ("fisher", "gps")
LR_SCHEDULES = ("linear", "constant")
TRAIN_DTYPES = ("float32", "bfloat16", "float16")


def _positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value <= 0:
            raise InvalidRequest(f"{name} must be > 0, got {value}")


def _non_negative(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        if value is not None and value < 0:
            raise InvalidRequest(f"{name} must be >= 0, got {value}")


def _dropout(value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise InvalidRequest(f"dropout must be in [0, 1), got {value}")


def _targets(value: tuple[str, ...]) -> None:
    if not value or not all(isinstance(t, str) and t for t in value):
        raise InvalidRequest(f"target_modules must be non-empty module names, got {value!r}")


@dataclass(frozen=True)
class LoraOptions:
    """LoRA: a rank-`rank` update B·A on each target module, scaled by alpha/rank."""

    name: ClassVar[str] = "lora"
    default_lr: ClassVar[float] = 1e-3

    rank: int = 8
    """r of every target module."""
    alpha: float = 16.0
    """lora_alpha; the update is scaled by alpha/rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""

    def __post_init__(self) -> None:
        _positive(self, "rank", "alpha")
        _dropout(self.dropout)
        _targets(self.target_modules)


@dataclass(frozen=True)
class AdaLoraOptions:
    """AdaLoRA: SVD-form LoRA whose ranks shrink from init_r to target_r by gradient importance."""

    name: ClassVar[str] = "adalora"
    default_lr: ClassVar[float] = 1e-3

    init_r: int = 12
    """Rank every module starts with."""
    target_r: int = 4
    """Average rank per module left after the budget schedule."""
    alpha: float = 16.0
    """lora_alpha; the update is scaled by alpha/init_r."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""
    tinit: int | None = None
    """Steps at full budget before pruning starts; None derives it from the run length."""
    tfinal: int | None = None
    """Steps at the final budget at the end; None derives it from the run length."""
    delta_t: int | None = None
    """Steps between two budget allocations; None derives it from the run length."""
    orth_reg_weight: float = 0.5
    """Weight of the orthogonality regularizer on A and B."""
    beta1: float = 0.85
    """EMA coefficient of the sensitivity."""
    beta2: float = 0.85
    """EMA coefficient of the uncertainty."""

    def __post_init__(self) -> None:
        _positive(self, "init_r", "target_r", "alpha", "delta_t")
        _non_negative(self, "tinit", "tfinal", "orth_reg_weight")
        _dropout(self.dropout)
        _targets(self.target_modules)
        if self.target_r > self.init_r:
            raise InvalidRequest(f"target_r ({self.target_r}) must be <= init_r ({self.init_r})")
        for name in ("beta1", "beta2"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise InvalidRequest(f"{name} must be in (0, 1), got {getattr(self, name)}")


@dataclass(frozen=True)
class PrefixOptions:
    """Prefix tuning: trained key/value vectors of num_virtual_tokens positions in every layer."""

    name: ClassVar[str] = "prefix"
    default_lr: ClassVar[float] = 1e-2

    num_virtual_tokens: int = 16
    """Prefix length in KV positions."""
    projection: bool = False
    """Reparametrize the prefix through a two-layer MLP while training (saved already projected)."""
    encoder_hidden_size: int | None = None
    """Hidden size of that MLP; None takes the model's hidden size."""

    def __post_init__(self) -> None:
        _positive(self, "num_virtual_tokens", "encoder_hidden_size")


@dataclass(frozen=True)
class SparseOptions:
    """Gradient-selected sparse tuning: train only the entries of W that calibration gradients rank highest.

    Saved as a PEFT SHiRA adapter, which holds exactly r·(in+out) entries per module (the parameter count
    of a rank-r LoRA), so the budget is a rank equivalent.
    """

    name: ClassVar[str] = "sparse"
    default_lr: ClassVar[float] = 1e-3

    budget: float = 8.0
    """An integer r >= 1: r·(in+out) entries per module; or a fraction in (0, 1) of all target entries."""
    rule: str = "fisher"
    """fisher: top entries of Σ grad² per module (FISH mask); gps: top |Σ grad| per output row (GPS)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""
    calibration_examples: int = 128
    """Training examples (in file order) whose gradients score the entries."""

    def __post_init__(self) -> None:
        _positive(self, "budget", "calibration_examples")
        if not (0.0 < self.budget < 1.0 or float(self.budget).is_integer()):
            raise InvalidRequest(
                "sparse budget must be an integer rank equivalent >= 1 or a fraction in (0, 1), "
                f"got {self.budget}"
            )
        if self.rule not in SPARSE_RULES:
            raise InvalidRequest(f"sparse rule must be one of {', '.join(SPARSE_RULES)}, got {self.rule!r}")
        _targets(self.target_modules)


@dataclass(frozen=True)
class DoraOptions:
    """DoRA: LoRA's update with a learned magnitude per output feature (weight-decomposed LoRA)."""

    name: ClassVar[str] = "dora"
    default_lr: ClassVar[float] = 2e-3

    rank: int = 8
    """r of every target module."""
    alpha: float = 16.0
    """lora_alpha; the update is scaled by alpha/rank."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""

    def __post_init__(self) -> None:
        _positive(self, "rank", "alpha")
        _dropout(self.dropout)
        _targets(self.target_modules)


@dataclass(frozen=True)
class Ia3Options:
    """IA³: learned vectors scaling the input of feedforward modules and the output of the others."""

    name: ClassVar[str] = "ia3"
    default_lr: ClassVar[float] = 2e-2

    target_modules: tuple[str, ...] | None = None
    """Modules to scale; None takes peft's choice for the model family (Llama: k_proj, v_proj, down_proj)."""
    feedforward_modules: tuple[str, ...] | None = None
    """The targets whose input is scaled (a subset of them); None takes peft's choice (Llama: down_proj)."""

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            value = getattr(self, name)
            if value is not None and not (
                isinstance(value, tuple) and all(isinstance(t, str) and t for t in value)
            ):
                raise InvalidRequest(f"{name} must be module names, got {value!r}")
        if self.feedforward_modules is not None and self.target_modules is None:
            raise InvalidRequest("feedforward_modules needs target_modules (a subset of them)")
        if self.target_modules is not None and self.feedforward_modules is not None:
            extra = set(self.feedforward_modules) - set(self.target_modules)
            if extra:
                raise InvalidRequest(f"feedforward_modules {sorted(extra)} are not among target_modules")


@dataclass(frozen=True)
class LohaOptions:
    """LoHa: the Hadamard product of two rank-r products on each target module."""

    name: ClassVar[str] = "loha"
    default_lr: ClassVar[float] = 2e-3

    rank: int = 8
    """r of both products."""
    alpha: float = 16.0
    """alpha; the update is scaled by alpha/rank."""
    module_dropout: float = 0.0
    """Probability of leaving a module's update out in a training step."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""

    def __post_init__(self) -> None:
        _positive(self, "rank", "alpha")
        _dropout(self.module_dropout)
        _targets(self.target_modules)


@dataclass(frozen=True)
class LokrOptions:
    """LoKr: the Kronecker product of two factors (the second, or both, low-rank) on each target module."""

    name: ClassVar[str] = "lokr"
    default_lr: ClassVar[float] = 2e-3

    rank: int = 8
    """r of the low-rank factors."""
    alpha: float = 16.0
    """alpha; the update is scaled by alpha/rank."""
    decompose_both: bool = False
    """Make the first factor low-rank too."""
    decompose_factor: int = -1
    """Split each dimension into factors near this size; -1: near its square root."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""

    def __post_init__(self) -> None:
        _positive(self, "rank", "alpha")
        if self.decompose_factor == 0 or self.decompose_factor < -1:
            raise InvalidRequest(f"decompose_factor must be -1 or > 0, got {self.decompose_factor}")
        _targets(self.target_modules)


@dataclass(frozen=True)
class VeraOptions:
    """VeRA: two learned vectors per module around frozen random projections shared by all modules."""

    name: ClassVar[str] = "vera"
    default_lr: ClassVar[float] = 1e-2

    rank: int = 256
    """r of the shared projections (they are frozen: only r + out values per module are trained)."""
    d_initial: float = 0.1
    """Initial value of the lambda_d vectors."""
    dropout: float = 0.0
    """Dropout on the adapter's input during training."""
    projection_prng_key: int = 0
    """Seed of the shared projections (adapters with the same key and rank share them when served)."""
    target_modules: tuple[str, ...] = ALL_LINEAR
    """Module names (or path suffixes) to adapt; 'all-linear' is every Linear except the head."""

    def __post_init__(self) -> None:
        _positive(self, "rank", "d_initial")
        _non_negative(self, "projection_prng_key")
        _dropout(self.dropout)
        _targets(self.target_modules)


MethodOptions = (
    LoraOptions
    | AdaLoraOptions
    | PrefixOptions
    | SparseOptions
    | DoraOptions
    | Ia3Options
    | LohaOptions
    | LokrOptions
    | VeraOptions
)
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    options.name: options
    for options in (
        LoraOptions,
        DoraOptions,
        AdaLoraOptions,
        Ia3Options,
        LohaOptions,
        LokrOptions,
        VeraOptions,
        PrefixOptions,
        SparseOptions,
    )
}
"""Method name -> its options class."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run: base model, data, method, optimization, checkpoints and output."""

    data: str = ""
    """JSONL training file (prompt/completion, text or messages per line)."""
    method: MethodOptions = field(default_factory=LoraOptions)
    """The adapter method and its options; the options' class names the method."""
    base: str = "default"
    """'default' (the embedded model) or a local Hugging Face model directory."""
    eval_data: str | None = None
    """JSONL evaluation file; None evaluates on the training data."""
    out_dir: str | None = None
    """Where the PEFT adapter directory is written; None skips saving (a push uses a temporary one)."""
    epochs: int | None = None
    """Passes over the training data; None chooses them from the data's size (run_length.py)."""
    max_steps: int | None = None
    """Optimizer steps of the run, exactly (no early stopping); None runs epochs."""
    lr: float | None = None
    """Peak learning rate; None takes the method's default."""
    lr_schedule: str = "linear"
    """linear: warm up then decay linearly to 0; constant: warm up then hold."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0 to lr."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm of the trainable parameters; None disables clipping."""
    batch_size: int = 8
    """Examples per optimizer step."""
    eval_every: int | None = None
    """Optimizer steps between evaluations; None: 20 evaluations over the run."""
    early_stopping: int = 3
    """Evaluations without improvement after which a run of epochs stops, keeping its best adapter
    (0: never); a max_steps run never stops early."""
    max_length: int = 512
    """Longest example in tokens; longer ones are skipped (with a warning)."""
    seed: int = 0
    """Seeds initialization, data order and dropout: same seed, same adapter bytes on CPU."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    dtype: str = "float32"
    """Base model dtype while training; adapter weights stay float32."""
    checkpoint_dir: str | None = None
    """Where checkpoints go; None disables them."""
    checkpoint_every: int = 100
    """Optimizer steps between checkpoints (the last step is always checkpointed)."""
    keep_checkpoints: int = 2
    """Most recent checkpoints kept on disk."""
    resume: bool = False
    """Continue from the latest checkpoint in checkpoint_dir (start from 0 when there is none)."""
    progress: bool = True
    """Show a tqdm progress bar with loss and tokens/s."""

    def __post_init__(self) -> None:
        if not self.data:
            raise InvalidRequest("training data is required (a JSONL file)")
        if not isinstance(self.method, tuple(METHOD_OPTIONS.values())):
            raise InvalidRequest(f"method must be one of {', '.join(METHOD_OPTIONS)} options")
        _positive(self, "epochs", "max_steps", "lr", "batch_size", "max_length", "checkpoint_every")
        _positive(self, "keep_checkpoints", "max_grad_norm", "eval_every")
        _non_negative(self, "warmup_steps", "weight_decay", "early_stopping")
        if self.lr is not None and not math.isfinite(self.lr):
            raise InvalidRequest(f"lr must be finite, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InvalidRequest(
                f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        if self.dtype not in TRAIN_DTYPES:
            raise InvalidRequest(f"dtype must be one of {', '.join(TRAIN_DTYPES)}, got {self.dtype!r}")
        if self.resume and not self.checkpoint_dir:
            raise InvalidRequest("resume needs a checkpoint_dir")

    @property
    def learning_rate(self) -> float:
        """lr, or the method's default."""
        return self.lr if self.lr is not None else self.method.default_lr
