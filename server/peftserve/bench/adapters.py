"""Random-weight LoRA adapters written directly in PEFT format, laid out as an adapter store.

Layout: ``<store>/<tenant>/<name>/v1/{adapter_config.json, adapter_model.safetensors}``, one tenant per
adapter pool, served as ``<tenant>/<name>``. How the server learns about them is decided in one place,
`registration_flags`.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from peftserve.bench.config import AdapterPool
from peftserve.bench.shapes import Shape

VERSION = "v1"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def adapter_name(index: int) -> str:
    return f"a{index:04d}"


def served_id(tenant: str, name: str) -> str:
    """The id a request names a stored adapter by (its current version)."""
    return f"{tenant}/{name}"


def adapter_ranks(pool: AdapterPool, seed: int) -> list[int]:
    """The rank of each adapter of the pool, drawn from pool.ranks (seeded)."""
    rng = random.Random(f"{seed}:ranks:{pool.tenant}")
    return [rng.choice(pool.ranks) for _ in range(pool.count)]


@dataclass(frozen=True)
class PublishedPool:
    """A pool written into the store: where each adapter is and what the server calls it."""

    pool: AdapterPool
    directories: tuple[Path, ...]
    ids: tuple[str, ...]
    ranks: tuple[int, ...]
    adapter_bytes: tuple[int, ...]
    """fp32 bytes of each adapter's A and B matrices."""

    def peft_name(self, index: int) -> str:
        """The adapter's name inside a PeftModel (module-dict keys cannot contain '.' or '/')."""
        return f"{self.pool.tenant}_{adapter_name(index)}"


def _module_paths(shape: Shape, targets: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    """(module path in the base model, projection name) of every targeted module."""
    for layer in range(shape.layers):
        for target in targets:
            block = "self_attn" if target in ATTENTION else "mlp"
            yield f"model.layers.{layer}.{block}.{target}", target


def write_lora(directory: Path, shape: Shape, rank: int, targets: tuple[str, ...], seed: int) -> None:
    """Write one random LoRA (alpha = 2 * rank) in PEFT format.

    A ~ N(0, 1/in) and B ~ N(0, 1e-4), so the delta is small and logits stay finite; speed does not
    depend on the values.
    """
    directory.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    config.save_pretrained(str(directory))
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for path, target in _module_paths(shape, targets):
        out_features, in_features = shape.projection_shape(target)
        a = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)  # [r, in]
        b = torch.randn(out_features, rank, generator=gen) * 1e-2  # [out, r]
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
    save_file(tensors, str(directory / "adapter_model.safetensors"))


def publish_pool(store: Path, pool: AdapterPool, shape: Shape, seed: int, stamps: Path) -> PublishedPool:
    """Write the pool under `<store>/<tenant>/`, or reuse it when an identical one is already there.

    `stamps` keeps one JSON per tenant describing what was written (outside the store, so only
    adapters lie in it); a mismatch rewrites the tenant from scratch.
    """
    ranks = adapter_ranks(pool, seed)
    names = [adapter_name(i) for i in range(pool.count)]
    directories = tuple(store / pool.tenant / name / VERSION for name in names)
    stamp = {"pool": asdict(pool), "shape": asdict(shape), "seed": seed, "version": VERSION}
    stamp_file = stamps / f"{pool.tenant}.json"
    if not (stamp_file.is_file() and json.loads(stamp_file.read_text()) == json.loads(json.dumps(stamp))):
        shutil.rmtree(store / pool.tenant, ignore_errors=True)
        for i, (directory, rank) in enumerate(zip(directories, ranks, strict=True)):
            write_lora(
                directory, shape, rank, pool.targets, seed=zlib.crc32(f"{seed}:{pool.tenant}:{i}".encode())
            )
        stamps.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps(stamp, indent=2) + "\n")
    return PublishedPool(
        pool=pool,
        directories=directories,
        ids=tuple(served_id(pool.tenant, name) for name in names),
        ranks=tuple(ranks),
        adapter_bytes=tuple(4 * shape.lora_params(rank, pool.targets) for rank in ranks),
    )


def registration_flags(pools: Sequence[PublishedPool]) -> list[str]:
    """The `peftserve serve` flags that register every adapter of the pools: the one place that does.

    The folders follow the versioned store's layout, but `serve --store` does not serve that layout yet
    (the store commits a manifest.json with each upload, and startup does not read the store); until it
    does, each adapter is registered under its id with `--adapter ID=DIR`, and the default store is off.
    """
    flags = ["--store", ""]
    for published in pools:
        for adapter_id, directory in zip(published.ids, published.directories, strict=True):
            flags += ["--adapter", f"{adapter_id}={directory}"]
    return flags
