"""PEFT's on-disk format: reading a directory (safetensors only) and the checks every kind shares."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from peftserve.errors import AdapterRejected, FailedPrecondition, quote
from peftserve.store.files import read_regular_file, sha256_hex
from peftserve.store.peft_files import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    parse_config,
)
from peftserve.store.safetensors_header import check_safetensors

STATE_PREFIX = "base_model.model."
"""PEFT saves tensor keys relative to the PeftModel; stripping this leaves the path in the base model."""

MAX_MAGNITUDE = 1e4
"""Largest |value| an adapter may hold: each stored tensor entry, each scaling (lora_alpha / r and its
kin), and each served tensor once its scaling is folded in. Trained adapters sit orders of magnitude
below it; it keeps a hostile adapter from overflowing activations (float16 ends at 65504)."""

Config = Mapping[str, Any]
Tensors = dict[str, torch.Tensor]


def _read(file: Path, max_bytes: int | None, follow_symlinks: bool) -> bytes:
    try:
        return read_regular_file(file, max_bytes, follow_symlinks)
    except (OSError, FailedPrecondition) as exc:
        raise AdapterRejected(f"{file.name}: cannot be read ({exc})") from exc


def read_adapter_dir(
    path: str | Path, expected_sha256: Mapping[str, str] | None = None, follow_symlinks: bool = True
) -> tuple[dict[str, Any], Tensors]:
    """The parsed adapter_config.json and the tensors of adapter_model.safetensors (on CPU).

    The safetensors bytes pass the hand-written header check before the library parses them. With
    expected_sha256 (a manifest's), both files must hash to it. The store reads with follow_symlinks=False.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapterRejected(f"{root.name}: not a directory")
    config_file = root / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterRejected(f"no {CONFIG_NAME}")
    weights_file = root / WEIGHTS_NAME
    if not weights_file.is_file():
        pickled = sorted(n for n in os.listdir(root) if n.lower().endswith(PICKLE_SUFFIXES))
        if pickled:
            raise AdapterRejected(
                f"only {pickled[0]} (pickle) was found; pickled weights are never loaded, "
                f"save the adapter with safe_serialization=True to get {WEIGHTS_NAME}"
            )
        raise AdapterRejected(f"no {WEIGHTS_NAME}")
    config_bytes = _read(config_file, MAX_CONFIG_BYTES, follow_symlinks)
    weights = _read(weights_file, None, follow_symlinks)
    if expected_sha256 is not None:
        for name, data in ((CONFIG_NAME, config_bytes), (WEIGHTS_NAME, weights)):
            if sha256_hex(data) != expected_sha256.get(name):
                raise AdapterRejected(
                    f"{name}: contents differ from the manifest's sha256 (damaged or changed)"
                )
    config = parse_config(config_bytes)
    check_safetensors(weights, WEIGHTS_NAME)
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, ValueError) as exc:
        raise AdapterRejected(f"{WEIGHTS_NAME}: unreadable safetensors file ({exc})") from exc
    return config, tensors


def module_tensors(tensors: Tensors, param_names: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Group tensors by module path: {'model.layers.0.mlp.up_proj': {'lora_A.weight': ...}}.

    Every key must be `base_model.model.<module path>.<one of param_names>`; anything else (a trained
    bias, a modules_to_save copy, an embedding adapter, a tensor of another kind) is not served and is
    rejected with the tensor's name.
    """
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if not key.startswith(STATE_PREFIX):
            raise AdapterRejected(
                f"unexpected tensor {quote(key)} (expected keys starting with {STATE_PREFIX!r})"
            )
        rest = key[len(STATE_PREFIX) :]
        for param in param_names:
            if rest.endswith("." + param):
                grouped.setdefault(rest[: -len(param) - 1], {})[param] = value
                break
        else:
            raise AdapterRejected(f"tensor {quote(key)} is not served (only {', '.join(param_names)} are)")
    return grouped


def check_magnitude(name: str, value: torch.Tensor) -> None:
    """AdapterRejected naming the tensor when it holds NaN, Inf or a value beyond MAX_MAGNITUDE."""
    if not value.is_floating_point() or value.numel() == 0:
        return
    if not bool(torch.isfinite(value).all()):
        raise AdapterRejected(f"tensor {quote(name)} contains NaN or Inf")
    largest = float(value.abs().max())
    if largest > MAX_MAGNITUDE:
        raise AdapterRejected(
            f"tensor {quote(name)} holds a value of magnitude {largest:.3g}, "
            f"beyond the limit of {MAX_MAGNITUDE:g}"
        )


def check_scaling(scaling: float, fields: str) -> float:
    """scaling, when |scaling| <= MAX_MAGNITUDE; AdapterRejected naming the fields it came from otherwise."""
    if not abs(scaling) <= MAX_MAGNITUDE:
        raise AdapterRejected(
            f"{fields} give a scaling of {scaling:.3g}, beyond the limit of {MAX_MAGNITUDE:g} in magnitude"
        )
    return scaling


def reject_if_set(config: Config, field: str, why: str) -> None:
    """Reject when `field` is present and truthy (not None/False/empty)."""
    if config.get(field):
        raise AdapterRejected(f"{field}={quote(config[field])}: {why}")


def finite_number(config: Config, field: str, default: float | None = None) -> float:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AdapterRejected(f"{field}={quote(value)}: expected a finite number")
    return float(value)


def positive_int(config: Config, field: str, default: int | None = None) -> int:
    value = config.get(field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise AdapterRejected(f"{field}={value!r}: expected a positive integer")
    return value


def _pattern(config: Config, field: str) -> Mapping[str, object]:
    value = config.get(field) or {}
    if not isinstance(value, Mapping):
        raise AdapterRejected(f"{field}: expected an object mapping module patterns to numbers")
    return value


def pattern_key(patterns: Mapping[str, object], module_path: str) -> str | None:
    """The key of a rank_pattern/alpha_pattern that names this module, resolved by peft itself."""
    try:
        key = get_pattern_key(list(patterns), module_path)
    except re.error as exc:
        raise AdapterRejected(f"a pattern key of {list(patterns)!r} is not a valid regex ({exc})") from exc
    return key if key in patterns else None


@dataclass(frozen=True)
class RankAlpha:
    """A module's configured rank and alpha, with the config fields they came from (for messages)."""

    r: int
    alpha: float
    r_field: str
    alpha_field: str


def rank_and_alpha(
    config: Config, path: str, r_default: int, alpha_name: str, alpha_default: float
) -> RankAlpha:
    """r and alpha of one module: rank_pattern/alpha_pattern when a key names it, else r / `alpha_name`."""
    r_key = pattern_key(_pattern(config, "rank_pattern"), path)
    if r_key is None:
        r, r_field = config.get("r", r_default), "r"
    else:
        r, r_field = config["rank_pattern"][r_key], f"rank_pattern[{r_key!r}]"
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterRejected(f"{r_field}={r!r}: expected a positive integer")
    alpha_key = pattern_key(_pattern(config, "alpha_pattern"), path)
    if alpha_key is None:
        alpha, alpha_field = finite_number(config, alpha_name, alpha_default), alpha_name
    else:
        alpha_field = f"alpha_pattern[{alpha_key!r}]"
        alpha = finite_number(config["alpha_pattern"], alpha_key)
    return RankAlpha(r, alpha, r_field, alpha_field)


def require(params: Mapping[str, torch.Tensor], path: str, *names: str) -> list[torch.Tensor]:
    """The named tensors of one module, AdapterRejected naming the first one missing."""
    for name in names:
        if name not in params:
            raise AdapterRejected(f"module {path!r}: {name} is missing")
    return [params[name] for name in names]
