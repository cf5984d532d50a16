"""Load the frozen base model and its tokenizer from 'default' or a local HF directory, safely."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from peftserve.errors import InvalidRequest
from peftserve.model.default_model import ensure_default_model
from peftserve.model.families import check_config
from peftserve.model.text import load_tokenizer

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BF16_UNITS = {"AMX": "amx_bf16", "AVX512-BF16": "avx512_bf16"}
"""The CPU units that multiply bfloat16 natively, and their /proc/cpuinfo flags."""


@dataclass(frozen=True)
class LoadedModel:
    """A frozen base model ready to serve, with what the engine needs to know about it."""

    model: PreTrainedModel
    """In eval mode, every parameter with requires_grad False."""
    tokenizer: PreTrainedTokenizerBase
    model_id: str
    """'default' or the model directory's name."""
    directory: Path
    """Where it was loaded from."""
    family: str
    """config.model_type, e.g. 'llama'."""
    dtype: torch.dtype
    device: torch.device
    max_context: int
    """max_position_embeddings (or n_positions)."""
    eos_token_ids: tuple[int, ...]
    """From generation_config then config, deduplicated, in that order."""


def resolve_device(device: str) -> torch.device:
    """'cpu', 'cuda' or 'cuda:N' as a torch.device; InvalidRequest if it cannot be used here."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise InvalidRequest(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequest("cuda requested but torch.cuda.is_available() is False")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise InvalidRequest(f"{device} requested but only {count} CUDA devices exist")
    return resolved


def cpu_bf16_units() -> str | None:
    """The bfloat16 units of this CPU ('AMX' or 'AVX512-BF16'), or None where it has neither."""
    try:  # torch's own probes; private, hence the kernel's flags where they are missing
        amx, avx512 = torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported()
        present = {"AMX": amx, "AVX512-BF16": avx512}
    except AttributeError:
        flags = cpu_flags()
        present = {name: flag in flags for name, flag in BF16_UNITS.items()}
    return next((name for name, yes in present.items() if yes), None)


def cpu_flags() -> set[str]:
    """The flags /proc/cpuinfo gives this CPU (empty where it is not there)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return next((set(line.partition(":")[2].split()) for line in lines if line.startswith("flags")), set())


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' is bfloat16 on CUDA and on CPUs with bfloat16 units (AVX512-BF16 or AMX), float32 on
    other CPUs; otherwise the named dtype."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        units = cpu_bf16_units()
        if units is None:
            log.info("dtype auto: float32 (this CPU has no bfloat16 units: AVX512-BF16 or AMX)")
            return torch.float32
        log.info("dtype auto: bfloat16 (this CPU multiplies it natively: %s)", units)
        return torch.bfloat16
    if dtype not in TORCH_DTYPES:
        raise InvalidRequest(f"dtype must be 'auto' or one of {', '.join(TORCH_DTYPES)}, got {dtype!r}")
    return TORCH_DTYPES[dtype]


def resolve_model_dir(model: str) -> tuple[Path, str]:
    """The model directory and its id; 'default' builds the embedded model on first use."""
    if model == "default":
        return ensure_default_model(), "default"
    directory = Path(model).expanduser()
    if not directory.is_dir():
        raise InvalidRequest(f"model must be 'default' or a local directory; {model!r} is not a directory")
    if not (directory / "config.json").is_file():
        raise InvalidRequest(f"model directory {model!r} has no config.json (is it a Hugging Face model?)")
    return directory.resolve(), directory.resolve().name


def check_family(directory: Path) -> str:
    """The config's model_type if we serve its family; InvalidRequest naming the nearest one otherwise."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{directory / 'config.json'} is not a readable JSON object: {exc}") from exc
    if not isinstance(config, dict):
        raise InvalidRequest(f"{directory / 'config.json'} is not a JSON object")
    return check_config(config).model_type


def check_safetensors(directory: Path) -> None:
    """Refuse directories without safetensors weights: pickled checkpoints can run arbitrary code."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise InvalidRequest(
            f"{directory} only has pickled weights ({', '.join(pickles)}); peftserve loads safetensors only "
            "(convert them, e.g. model.save_pretrained(dir, safe_serialization=True))"
        )
    raise InvalidRequest(f"{directory} has no *.safetensors weights")


def eos_token_ids(model: PreTrainedModel) -> tuple[int, ...]:
    """EOS ids of generation_config then config (each may be an int, a list or None), deduplicated."""
    ids: list[int] = []
    sources = (getattr(model.generation_config, "eos_token_id", None), model.config.eos_token_id)
    for value in sources:
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and token_id not in ids:
                ids.append(int(token_id))
    return tuple(ids)


def max_context(model: PreTrainedModel) -> int:
    """The longest sequence the model's positions cover."""
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(model.config, name, None)
        if value:
            return int(value)
    raise InvalidRequest(f"{model.config.model_type} config has no max_position_embeddings or n_positions")


def load_base_model(model: str, device: str, dtype: str) -> LoadedModel:
    """Load `model` ('default' or a local HF directory) frozen, on `device`, in `dtype` ('auto' allowed)."""
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    directory, model_id = resolve_model_dir(model)
    family = check_family(directory)
    check_safetensors(directory)
    # transformers' default attention (sdpa, or eager for families without it: Gemma 2, GPT-OSS) until
    # the runner installs its own.
    hf_model = AutoModelForCausalLM.from_pretrained(
        directory,
        dtype=torch_dtype,
        local_files_only=True,
        use_safetensors=True,
        trust_remote_code=False,
    )
    hf_model.to(torch_device).eval().requires_grad_(False)
    tokenizer = load_tokenizer(directory)
    return LoadedModel(
        model=hf_model,
        tokenizer=tokenizer,
        model_id=model_id,
        directory=directory,
        family=family,
        dtype=torch_dtype,
        device=torch_device,
        max_context=max_context(hf_model),
        eos_token_ids=eos_token_ids(hf_model),
    )
