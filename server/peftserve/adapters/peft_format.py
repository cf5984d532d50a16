"""PEFT's on-disk format: reading a directory (safetensors only) and the checks every kind shares."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from peftserve.errors import AdapterRejected

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
STATE_PREFIX = "base_model.model."
"""PEFT saves tensor keys relative to the PeftModel; stripping this leaves the path in the base model."""

Config = Mapping[str, Any]
Tensors = dict[str, torch.Tensor]


def read_adapter_dir(path: str | Path) -> tuple[dict[str, Any], Tensors]:
    """The parsed adapter_config.json and the tensors of adapter_model.safetensors (on CPU)."""
    root = Path(path)
    if not root.is_dir():
        raise AdapterRejected(f"{root}: not a directory")
    config_file = root / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterRejected(f"{root}: no {CONFIG_NAME}")
    weights_file = root / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = [n for n in PICKLE_NAMES if (root / n).exists()]
        if pickled:
            raise AdapterRejected(
                f"{root}: only {pickled[0]} (pickle) was found; pickled weights are never loaded, "
                f"save the adapter with safe_serialization=True to get {WEIGHTS_NAME}"
            )
        raise AdapterRejected(f"{root}: no {WEIGHTS_NAME}")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterRejected(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterRejected(f"{config_file}: expected a JSON object")
    try:
        tensors = load_file(str(weights_file), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise AdapterRejected(f"{weights_file}: unreadable safetensors file ({exc})") from exc
    return config, tensors


def module_tensors(tensors: Tensors, param_names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by module path: {'model.layers.0.mlp.up_proj': {'lora_A.weight': ...}}.

    Every key must be `base_model.model.<module path>.<one of param_names>`; anything else (a trained
    bias, a modules_to_save copy, a DoRA magnitude, an embedding adapter) is not served and is rejected
    with the tensor's name.
    """
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(STATE_PREFIX):
            raise AdapterRejected(f"unexpected tensor {key!r} (expected keys starting with {STATE_PREFIX!r})")
        rest = key[len(STATE_PREFIX) :]
        for param in param_names:
            if rest.endswith("." + param):
                grouped.setdefault(rest[: -len(param) - 1], {})[param] = value
                break
        else:
            raise AdapterRejected(f"tensor {key!r} is not served (only {', '.join(param_names)} are)")
    return grouped


def check_finite(tensors: Tensors) -> None:
    for key, value in tensors.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise AdapterRejected(f"tensor {key!r} contains NaN or Inf")


def reject_if_set(config: Config, field: str, why: str) -> None:
    """Reject when `field` is present and truthy (not None/False/empty)."""
    if config.get(field):
        raise AdapterRejected(f"{field}={config[field]!r}: {why}")


def finite_number(config: Config, field: str, default: float | None = None) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterRejected(f"{field}={value!r}: expected a finite number")
    return float(value)
