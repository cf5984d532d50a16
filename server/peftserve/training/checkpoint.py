"""Checkpoints of a run: trainable parameters, optimizer moments, RNG and method state, safetensors + JSON.

Layout: `<checkpoint_dir>/step-00000040/{tensors.safetensors, state.json}`, written beside and renamed
into place, so a crash never leaves a half checkpoint that --resume would pick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftserve.errors import InvalidRequest
from peftserve.training.methods import MethodState

TENSORS = "tensors.safetensors"
STATE = "state.json"
STEP_DIR = re.compile(r"step-(\d{8})")
FORMAT = 1


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run after `step` optimizer steps exactly as if never stopped."""

    step: int
    params: dict[str, torch.Tensor]
    """Trainable parameters by name."""
    optimizer: dict[int, dict[str, torch.Tensor]]
    """The optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq) by parameter index."""
    rng: dict[str, torch.Tensor]
    """'cpu' and, when training on CUDA, 'cuda' generator states."""
    method: MethodState
    meta: dict[str, Any] = field(default_factory=dict)
    """The run's own bookkeeping (eval loss before, recent losses, tokens seen) and its fingerprint."""
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    """Trainable parameters at the best evaluation so far (empty before the first)."""


def save_checkpoint(directory: str | Path, checkpoint: Checkpoint, keep: int) -> Path:
    """Write `checkpoint` as step-NNNNNNNN under `directory`, then drop all but the `keep` newest."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{checkpoint.step:08d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {f"param/{name}": value for name, value in checkpoint.params.items()}
    for index, state in checkpoint.optimizer.items():
        tensors |= {f"optim/{index}/{key}": value for key, value in state.items()}
    tensors |= {f"rng/{name}": value for name, value in checkpoint.rng.items()}
    tensors |= {f"method/{name}": value for name, value in checkpoint.method.tensors.items()}
    tensors |= {f"best/{name}": value for name, value in checkpoint.best.items()}
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp / TENSORS))
    state = {
        "format": FORMAT,
        "step": checkpoint.step,
        "method": checkpoint.method.meta,
        "meta": checkpoint.meta,
    }
    (tmp / STATE).write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    for old in checkpoint_dirs(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_dirs(directory: str | Path) -> list[Path]:
    """Complete checkpoints under `directory`, oldest first."""
    root = Path(directory)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.fullmatch(p.name).group(1)))


def load_checkpoint(path: str | Path, device: torch.device) -> Checkpoint:
    """Read a checkpoint directory; method tensors go to `device`, the rest stays on the CPU for now."""
    path = Path(path)
    try:
        state = json.loads((path / STATE).read_text())
        tensors = load_file(str(path / TENSORS), device="cpu")
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"checkpoint {path} is unreadable: {exc}") from exc
    if state.get("format") != FORMAT:
        raise InvalidRequest(f"checkpoint {path} has format {state.get('format')!r}, expected {FORMAT}")
    groups: dict[str, dict[str, torch.Tensor]] = {
        "param": {},
        "optim": {},
        "rng": {},
        "method": {},
        "best": {},
    }
    for key, value in tensors.items():
        kind, _, name = key.partition("/")
        groups[kind][name] = value.to(device) if kind == "method" else value
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in groups["optim"].items():
        index, _, name = key.partition("/")
        optimizer.setdefault(int(index), {})[name] = value
    return Checkpoint(
        step=int(state["step"]),
        params=groups["param"],
        optimizer=optimizer,
        rng=groups["rng"],
        method=MethodState(groups["method"], state.get("method") or {}),
        meta=state.get("meta") or {},
        best=groups["best"],
    )


def capture(
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    method: MethodState,
    meta: dict[str, Any],
    best: dict[str, torch.Tensor] | None = None,
) -> Checkpoint:
    """The run's state right after optimizer step `step` - 1 (that is, after `step` steps)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer_state = {
        int(index): {k: v if torch.is_tensor(v) else torch.tensor(v) for k, v in state.items()}
        for index, state in optimizer.state_dict()["state"].items()
    }
    rng = {"cpu": torch.get_rng_state()}
    device = next(iter(params.values())).device
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return Checkpoint(step, params, optimizer_state, rng, method, meta, dict(best or {}))


def restore(model: nn.Module, optimizer: torch.optim.Optimizer, checkpoint: Checkpoint) -> None:
    """Put parameters, optimizer state and RNG back as they were when `checkpoint` was captured."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(params) != set(checkpoint.params):
        missing = sorted(set(params) ^ set(checkpoint.params))[:3]
        raise InvalidRequest(f"checkpoint does not match the model's trainable parameters (e.g. {missing})")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(checkpoint.params[name])
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": checkpoint.optimizer, "param_groups": groups})
    torch.set_rng_state(checkpoint.rng["cpu"])
    if "cuda" in checkpoint.rng:
        device = next(iter(params.values())).device
        torch.cuda.set_rng_state(checkpoint.rng["cuda"], device)
