"""A real `peftserve cluster` of two replicas of the embedded model on a local Ray cluster (module scope).

It runs with API keys and a store in a temporary folder; one CPU and one torch thread per replica; gRPC
on one port and the OpenAI-compatible HTTP API on another.
"""

from __future__ import annotations

import re
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

from peftserve.auth import KeyRing, Scope
from peftserve.bench.adapters import write_lora
from peftserve.bench.server import ServerProcess
from peftserve.bench.shapes import Shape
from peftserve.deploy.cli import free_port

DEFAULT_MODEL = Shape("default", hidden=256, intermediate=688, heads=8, kv_heads=2, layers=4, vocab=1024)
"""The embedded default model's shape (`peftserve model path`)."""
SLOTS = 4
"""Device adapter slots per replica, and so the adapters Ray keeps routed to each replica."""
REPLICA_LINE = re.compile(r"replica (\S+) serving \(pid (\d+), metrics (\S+)\)")


def write_adapter(directory: Path, seed: int) -> Path:
    """A rank-8 LoRA on the attention projections, strong enough to change greedy tokens."""
    write_lora(directory, DEFAULT_MODEL, 8, ("q_proj", "v_proj", "o_proj"), seed)
    weights = directory / "adapter_model.safetensors"
    tensors = {k: v * 40 if "lora_B" in k else v for k, v in load_file(weights).items()}
    save_file({k: v.contiguous().to(torch.float32) for k, v in tensors.items()}, weights)
    return directory


@dataclass
class Cluster:
    process: ServerProcess
    address: str
    """gRPC HOST:PORT."""
    http_url: str
    """http://HOST:PORT of the HTTP API."""
    keys: dict[str, str]
    keys_file: Path
    adapters: Path
    """Folder of PEFT adapter directories the tests upload."""

    def replicas(self) -> dict[str, int]:
        """Replica id -> pid, from the replicas' own start lines (replacements included)."""
        return {m.group(1): int(m.group(2)) for m in map(REPLICA_LINE.search, self.process.log) if m}

    def metric_sum(self, name: str, url: str | None = None, **labels: str) -> float:
        """A counter or gauge summed over every replica, from url (default: the --metrics-port endpoint)."""
        url = url or self.process.metrics_url
        assert url is not None
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            if family.name == name
            for s in family.samples
            if s.name in (name, f"{name}_total") and all(s.labels.get(k) == v for k, v in labels.items())
        )


def cluster_process(args: list[str], log_path: Path) -> ServerProcess:
    argv = [sys.executable, "-m", "peftserve.cli", "cluster", "--port", str(free_port("127.0.0.1"))]
    argv += ["--http-port", str(free_port("127.0.0.1")), "--metrics-port", "0", *args]
    return ServerProcess(argv, log_path)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cluster")
    ring, keys = KeyRing(), {}
    for name, tenant, scopes in (
        ("acme", "acme", [Scope.INFER, Scope.ADMIN]),
        ("globex", "globex", [Scope.INFER, Scope.ADMIN]),
        ("acme-infer", "acme", [Scope.INFER]),
    ):
        ring, keys[name] = ring.add(tenant, scopes)
    ring.save(root / "keys.json")
    adapters = root / "adapters"
    for i in range(8):
        write_adapter(adapters / f"a{i}", seed=100 + i)
    process = cluster_process(
        ["--replicas", "2", "--replica-cpus", "1", "--threads", "1", "--adapter-slots", str(SLOTS),
         "--store", str(root / "store"), "--keys-file", str(root / "keys.json"), "--grace-s", "30",
         "--dtype", "float32"],  # outputs compared token for token: bf16 rounding depends on the batch
        root / "cluster.log",
    )  # fmt: skip
    try:
        address = process.wait_ready(240)
        assert process.http_url is not None
        yield Cluster(process, address, process.http_url, keys, root / "keys.json", adapters)
    finally:
        process.stop(60)
