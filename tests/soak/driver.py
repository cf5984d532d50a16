"""The soak: a real server under concurrent streams, hot swaps, cancellations and admin calls, checked.

Three tenants (API keys) generate concurrently over six adapters, each replaced at random by another
of every kind served (LoRA, DoRA, IA3, LoHa, LoKr, VeRA, sparse, prefix), and over the base model,
pinned to a version or not, some streams cancelled after their first token, while
adapters are replaced several times a second and admin calls (list, get, load, pin, unload) run beside
them. Every completed output must equal the expected output of the version that served it (computed
once, one request at a time, before the soak starts); any error is unexpected. At the end the KV
cache must be empty, and the server's RSS flat after warm-up.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peftserve_client import AsyncClient, PeftServeError, ResourceExhausted

TENANTS = ("acme", "globex", "initech")
NAMES = ("a", "b")
PROMPTS = (
    "Hello",
    "Q: Do you ship abroad?\nA:",
    "Once upon a time there was a tenant with an adapter of its own",
    "The quick brown fox jumps over the lazy dog. " * 6,
    "1 2 3 4 5 6 7 8 9 10",
    "A short one",
)
NEW_TOKENS = 8


@dataclass
class SoakReport:
    """What a soak did and saw."""

    seconds: float = 0.0
    completed: int = 0
    cancelled: int = 0
    swaps: int = 0
    admin_calls: int = 0
    slots_busy: int = 0
    """Loads and pins refused because every device slot was held by running requests (documented)."""
    tokens: int = 0
    mismatches: list[str] = field(default_factory=list)
    errors: Counter = field(default_factory=Counter)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since start, server RSS in MB), sampled."""
    kv_blocks_used_at_end: float | None = None

    def growth_after(self, start_s: float) -> float:
        """Relative RSS growth from the first sample at or after start_s to the last sample."""
        later = [mb for t, mb in self.rss_mb if t >= start_s]
        return later[-1] / later[0] - 1.0 if len(later) >= 2 else 0.0

    def as_json(self) -> str:
        data = asdict(self)
        data["errors"] = dict(self.errors)
        return json.dumps(data, indent=2)


class Versions:
    """Which variant each adapter version holds, and when it may have been current (unpinned requests)."""

    def __init__(self) -> None:
        self.variant: dict[str, int] = {}  # 'acme/a@v3' -> variant index
        self.history: dict[str, list[tuple[float, float, str]]] = {}  # id -> [(upload start, ack, key)]

    def committed(self, adapter_id: str, version: str, variant: int, started: float) -> None:
        """A version whose upload started at `started` and was acknowledged now (it committed in between)."""
        key = f"{adapter_id}@{version}"
        self.variant[key] = variant
        self.history.setdefault(adapter_id, []).append((started, time.monotonic(), key))

    def recent(self, adapter_id: str, n: int = 2) -> list[str]:
        """The n newest versions (older ones may be pruned at any moment)."""
        return [key for _, _, key in self.history[adapter_id][-n:]]

    def current_during(self, adapter_id: str, start: float, end: float) -> set[int]:
        """Variants that may have been the current version at some moment of [start, end].

        A version is current from its commit (after its upload started) until the next one's commit
        (before that upload's acknowledgement).
        """
        entries = self.history[adapter_id]
        found = set()
        for i, (started, _, key) in enumerate(entries):
            replaced_by = entries[i + 1][1] if i + 1 < len(entries) else float("inf")
            if started <= end and replaced_by >= start:
                found.add(self.variant[key])
        return found


async def _tokens(client: AsyncClient, prompt: str, adapter_id: str | None) -> list[int]:
    result = await client.generate(prompt, adapter_id=adapter_id, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    return list(result.token_ids)


async def expected_outputs(
    client: AsyncClient, variants: list[Path]
) -> dict[int | None, dict[str, list[int]]]:
    """Each variant's (and the base model's) greedy tokens for every prompt, one request at a time."""
    expected: dict[int | None, dict[str, list[int]]] = {None: {}}
    for i, folder in enumerate(variants):
        await client.upload_adapter(folder, f"ref{i}")
        expected[i] = {}
    for prompt in PROMPTS:
        expected[None][prompt] = await _tokens(client, prompt, None)
        for i in range(len(variants)):
            expected[i][prompt] = await _tokens(client, prompt, f"ref{i}")
    return expected


def _rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def _metric(url: str, name: str) -> float | None:
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return None


async def run_soak(
    address: str,
    keys: dict[str, str],
    variants: list[Path],
    duration_s: float,
    server_pid: int,
    metrics_url: str,
    seed: int = 0,
    streams: int = 12,
    swaps_per_s: float = 3.0,
) -> SoakReport:
    """Run the soak for duration_s against a started server whose tenants' keys are given."""
    rng = random.Random(seed)
    report = SoakReport()
    versions = Versions()
    clients = {t: AsyncClient(address, api_key=keys[t], timeout=120) for t in TENANTS}
    try:
        expected = await expected_outputs(clients["acme"], variants)
        for tenant in TENANTS:
            for name in NAMES:
                variant, since = rng.randrange(len(variants)), time.monotonic()
                manifest = await clients[tenant].upload_adapter(variants[variant], name)
                versions.committed(manifest.adapter_id, manifest.version, variant, since)
        start = time.monotonic()
        deadline = start + duration_s

        def unexpected(what: str, err: BaseException) -> None:
            report.errors[f"{what}: {type(err).__name__}: {getattr(err, 'code', '')}"] += 1

        async def generator(worker: int) -> None:
            wrng = random.Random(seed * 1000 + worker)
            while time.monotonic() < deadline:
                tenant = wrng.choice(TENANTS)
                prompt = wrng.choice(PROMPTS)
                choice = wrng.random()
                adapter, pinned = None, None
                if choice > 0.15:
                    adapter = f"{tenant}/{wrng.choice(NAMES)}"
                    if choice > 0.6:
                        pinned = wrng.choice(versions.recent(adapter))
                cancel = wrng.random() < 0.2
                sent = time.monotonic()
                tokens: list[int] = []
                try:
                    stream = clients[tenant].generate_stream(
                        prompt, adapter_id=pinned or adapter, max_new_tokens=NEW_TOKENS, ignore_eos=True
                    )
                    async for chunk in stream:
                        tokens += chunk.token_ids
                        if cancel and tokens:
                            await stream.aclose()  # the client goes away: the server frees the request
                            break
                except PeftServeError as err:
                    unexpected("generate", err)
                    continue
                if cancel:
                    report.cancelled += 1
                    continue
                report.completed += 1
                report.tokens += len(tokens)
                if adapter is None:
                    allowed = {None}
                elif pinned is not None:
                    allowed = {versions.variant[pinned]}
                else:
                    allowed = versions.current_during(adapter, sent, time.monotonic())
                if not any(tokens == expected[v][prompt] for v in allowed):
                    report.mismatches.append(f"{pinned or adapter or 'base'} {prompt[:20]!r}: {tokens}")

        async def swapper() -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.expovariate(swaps_per_s))
                tenant, name = rng.choice(TENANTS), rng.choice(NAMES)
                variant, since = rng.randrange(len(variants)), time.monotonic()
                try:
                    manifest = await clients[tenant].upload_adapter(variants[variant], name)
                except PeftServeError as err:
                    unexpected("upload", err)
                    continue
                versions.committed(manifest.adapter_id, manifest.version, variant, since)
                report.swaps += 1

        async def administrator() -> None:
            pinned: tuple[str, str] | None = None  # one pin at a time: pins hold device slots
            while time.monotonic() < deadline:
                await asyncio.sleep(rng.expovariate(2.0))
                tenant, name = rng.choice(TENANTS), rng.choice(NAMES)
                client = clients[tenant]
                call = rng.choice(["list", "get", "load", "pin", "unload"])
                try:
                    if call == "list":
                        [s async for s in client.iter_adapters()]
                    elif call == "get":
                        await client.get_adapter(name)
                    elif call == "load":
                        await client.load_adapter(name)
                    elif call == "pin":
                        if pinned is not None:
                            await clients[pinned[0]].unload_adapter(pinned[1])
                        await client.load_adapter(name, pin=True)
                        pinned = (tenant, name)
                    else:
                        await client.unload_adapter(name)
                        pinned = None if pinned == (tenant, name) else pinned
                except ResourceExhausted as err:
                    if call in ("load", "pin") and "adapter slots" in err.message:
                        report.slots_busy += 1
                    else:
                        unexpected(call, err)
                    continue
                except PeftServeError as err:
                    unexpected(call, err)
                    continue
                report.admin_calls += 1

        async def sampler() -> None:
            while time.monotonic() < deadline:
                report.rss_mb.append((time.monotonic() - start, _rss_mb(server_pid)))
                await asyncio.sleep(min(5.0, duration_s / 20))

        await asyncio.gather(*(generator(i) for i in range(streams)), swapper(), administrator(), sampler())
        report.seconds = time.monotonic() - start
        report.rss_mb.append((report.seconds, _rss_mb(server_pid)))
        for _ in range(50):  # cancelled requests leave within a step; give the last ones a moment
            report.kv_blocks_used_at_end = _metric(metrics_url, "peftserve_kv_blocks_used")
            if report.kv_blocks_used_at_end == 0:
                break
            await asyncio.sleep(0.1)
    finally:
        for client in clients.values():
            await client.close()
    return report
